//! Ferry ebpf (see its issue).
