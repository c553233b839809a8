//! The master's dealings with the operating system, apart from policy:
//! fork/exec and fd passing (`sys`, the only `unsafe`), listening sockets
//! (`listen`), the guardian process (`guardian`), usable CPUs (`cpus`) and
//! the private runtime directory (`rundir`).

pub mod cpus;
pub mod guardian;
pub mod listen;
pub mod rundir;
pub mod sys;
