//! herd's master: supervises a cluster of worker processes on one port.
//!
//! `unsafe` is denied everywhere but in [`os::sys`], the fork/exec plumbing.
#![deny(unsafe_code)]

pub mod admin;
pub mod boot;
pub mod builtin;
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod dispatch;
pub mod hosts;
pub mod ipc;
pub mod logfile;
pub mod monit;
pub mod node;
pub mod os;
pub mod output;
pub mod perl;
pub mod proxy;
pub mod python;
pub mod start;
pub mod supervise;
pub mod tail;
pub mod upstream;
pub mod watch;
