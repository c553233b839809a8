//! The master's dealings with the operating system, apart from policy:
//! fork/exec and fd passing (`sys`), listening sockets (`listen`), client
//! sockets that join the event loop only to wait (`lazy`), the guardian
//! process (`guardian`), usable CPUs (`cpus`), the private runtime directory
//! (`rundir`), adopted children (`reaper`), what a worker listens on
//! (`sockets`) and whether a local server accepted a connection (`diag`). `sys` and `lazy` are the only
//! modules with `unsafe`.

pub mod cpus;
pub mod diag;
pub mod guardian;
pub mod lazy;
pub mod listen;
pub mod reaper;
pub mod rundir;
pub mod sockets;
pub mod sys;
