// The loader build-depends on this library target so that cargo rebuilds the loader whenever this
// crate changes; the program itself is the `tcpclose` binary target, built for bpfel.
#![no_std]
