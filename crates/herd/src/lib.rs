//! herd's master: supervises a cluster of worker processes on one port.
//!
//! `unsafe` is denied everywhere but in [`sys`], the fork/exec plumbing.
#![deny(unsafe_code)]

pub mod cli;
pub mod client;
pub mod config;
pub mod console;
pub mod control;
pub mod cpus;
pub mod dispatch;
pub mod guardian;
pub mod ipc;
pub mod listen;
pub mod logfile;
pub mod node;
pub mod output;
pub mod proxy;
pub mod rundir;
pub mod start;
pub mod supervise;
pub mod sys;
pub mod upstream;
