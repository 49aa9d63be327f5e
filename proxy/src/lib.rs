//! Ferry proxy (see its issue).
