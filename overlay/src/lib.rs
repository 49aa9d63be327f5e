//! Ferry overlay (see its issue).
