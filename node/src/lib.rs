//! Ferry node (see its issue).
