//! Ferry bench (see its issue).
