//! The master's dealings with the operating system, apart from policy:
//! fork/exec and fd passing (`sys`, the only `unsafe`), listening sockets
//! (`listen`), the guardian process (`guardian`), usable CPUs (`cpus`),
//! the private runtime directory (`rundir`) and adopted children (`reaper`).

pub mod cpus;
pub mod guardian;
pub mod listen;
pub mod reaper;
pub mod rundir;
pub mod sys;
