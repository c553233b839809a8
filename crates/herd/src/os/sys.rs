//! With `lazy`, the only modules with `unsafe`: the code that runs in a
//! worker between `fork` and `exec`, and passing a connection's fd to a
//! worker ([`send_fd`], dispatch mode), the guardian's ignored signals and
//! the signals blocked across `herd upgrade`'s exec ([`mask_signals`]),
//! reading a listening socket's accept queue ([`accept_queue`]) and steering
//! a reuseport group's new connections ([`steer_reuseport`]).
//!
//! Why it exists: systemd's socket-activation protocol wants `LISTEN_PID`
//! to be the worker's *own* pid, which only the child knows, and the worker
//! must be put in its own process group, armed with a parent-death signal
//! and given its inherited fds at fixed numbers before it runs any code.
//!
//! Everything that allocates is done in the parent ([`prepare`]); the child
//! only makes async-signal-safe calls (setpgid, prctl, getppid, sigemptyset,
//! pthread_sigmask, fcntl, dup2, getpid, execve) on memory prepared before
//! the fork, as `CommandExt::pre_exec` requires in a multi-threaded program.
#![allow(unsafe_code)]

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("argument or environment contains a NUL byte: {0:?}")]
    Nul(String),
}

/// What a worker process is turned into right after `fork`.
pub struct ExecSpec {
    pub program: PathBuf,
    pub argv: Vec<OsString>,
    /// The worker's whole environment; `LISTEN_PID` is added when `listen_pid`.
    pub env: Vec<(OsString, OsString)>,
    /// Whether `fds` include listening sockets (socket activation).
    pub listen_pid: bool,
    /// `(fd in the master, fd number in the worker)`; the master's fds must
    /// stay open until the spawn returns.
    pub fds: Vec<(RawFd, RawFd)>,
    /// The master's pid: a child that finds another parent was orphaned
    /// before it could arm its parent-death signal, and gives up.
    pub parent: i32,
}

/// Pointers into buffers owned by the same value, read or written only in
/// the child after `fork`, where no other thread exists.
struct Prepared {
    program: CString,
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// `LISTEN_PID=` followed by room for the digits and a NUL.
    listen_pid: Option<(Box<[u8]>, *mut u8)>,
    fds: Vec<(RawFd, RawFd)>,
    scratch: Vec<RawFd>,
    parent: libc::pid_t,
}

// SAFETY: the raw pointers point into heap buffers owned by this same value
// (`_strings`, `listen_pid`), which never move or change in the parent; the
// child mutates them only after `fork`, in its own copy of memory.
unsafe impl Send for Prepared {}
unsafe impl Sync for Prepared {}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

fn cstring(v: Vec<u8>) -> Result<CString, SysError> {
    CString::new(v).map_err(|e| {
        let v = e.into_vec();
        SysError::Nul(String::from_utf8_lossy(&v).into_owned())
    })
}

fn prepare(spec: ExecSpec) -> Result<Prepared, SysError> {
    let program = cstring(spec.program.into_os_string().into_vec())?;
    let mut strings = Vec::new();
    let mut argv = Vec::with_capacity(spec.argv.len() + 1);
    for a in spec.argv {
        let c = cstring(a.into_vec())?;
        argv.push(c.as_ptr());
        strings.push(c);
    }
    argv.push(std::ptr::null());
    let mut envp = Vec::with_capacity(spec.env.len() + 2);
    for (k, v) in spec.env {
        let mut kv = k.into_vec();
        kv.push(b'=');
        kv.extend(v.into_vec());
        let c = cstring(kv)?;
        envp.push(c.as_ptr());
        strings.push(c);
    }
    let listen_pid = if !spec.listen_pid {
        None
    } else {
        let mut buf = vec![0u8; LISTEN_PID_PREFIX.len() + 24].into_boxed_slice();
        buf[..LISTEN_PID_PREFIX.len()].copy_from_slice(LISTEN_PID_PREFIX);
        let ptr = buf.as_mut_ptr();
        envp.push(ptr as *const libc::c_char);
        Some((buf, ptr))
    };
    envp.push(std::ptr::null());
    let scratch = vec![-1; spec.fds.len()];
    Ok(Prepared {
        program,
        _strings: strings,
        argv,
        envp,
        listen_pid,
        fds: spec.fds,
        scratch,
        parent: spec.parent,
    })
}

/// Arranges for `cmd` to exec `spec` in a new process group with a
/// parent-death signal; the program, arguments and environment set on `cmd`
/// itself are not used. Stdio, cwd and the signal mask are still `cmd`'s.
pub fn install(cmd: &mut tokio::process::Command, spec: ExecSpec) -> Result<(), SysError> {
    let mut p = prepare(spec)?;
    // SAFETY: the closure runs in the child after fork and before exec; it
    // calls only async-signal-safe functions and touches only memory that
    // `prepare` allocated before the fork.
    unsafe {
        cmd.pre_exec(move || child_setup(&mut p));
    }
    Ok(())
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn child_setup(p: &mut Prepared) -> io::Result<()> {
    // SAFETY: each call is async-signal-safe and given valid pointers or plain ints.
    unsafe {
        // Own group: the master signals the worker and all its children at once,
        // and a terminal's Ctrl-C reaches only the master, which then drains.
        check(libc::setpgid(0, 0))?;
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        if libc::getppid() != p.parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // No signal blocked, as libuv starts Node's children: a mask is
        // inherited through exec, and one the master's thread had would
        // reach the app.
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        // Fails only for a bad `how`.
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // Move each fd to a number above every target first, so that
        // placing one cannot overwrite the source of another.
        let floor = p.fds.iter().map(|&(_, t)| t).max().unwrap_or(2) + 1;
        for (i, &(src, _)) in p.fds.iter().enumerate() {
            p.scratch[i] = check(libc::fcntl(src, libc::F_DUPFD_CLOEXEC, floor))?;
        }
        for (i, &(_, target)) in p.fds.iter().enumerate() {
            // dup2 leaves the new fd without FD_CLOEXEC: it survives exec.
            check(libc::dup2(p.scratch[i], target))?;
        }
        if let Some((_, ptr)) = &p.listen_pid {
            write_decimal(*ptr, LISTEN_PID_PREFIX.len(), libc::getpid() as u64);
        }
        libc::execve(p.program.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
    }
    Err(io::Error::last_os_error())
}

/// Writes `n` and a NUL at `buf + at`, without allocating.
///
/// # Safety
/// `buf` must have room for 21 more bytes after `at`.
unsafe fn write_decimal(buf: *mut u8, at: usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: the caller guarantees room for 20 digits and a NUL.
        unsafe { *buf.add(at + i) = digits[len - 1 - i] };
    }
    // SAFETY: as above.
    unsafe { *buf.add(at + len) = 0 };
}

/// Sets `sigs` to `SIG_IGN`. Only for a process that execs nothing (the
/// guardian): an ignored disposition is inherited through `exec`.
pub fn ignore_signals(sigs: &[nix::sys::signal::Signal]) {
    use nix::sys::signal::{SigHandler, signal};
    for &s in sigs {
        // SAFETY: SIG_IGN installs no handler, so no code runs in signal
        // context; the call only changes this process's disposition.
        let _ = unsafe { signal(s, SigHandler::SigIgn) };
    }
}

/// Blocks (`block`) or unblocks `sigs` on the calling thread. A blocked
/// signal stays pending, across `exec` too, until it is unblocked.
pub fn mask_signals(sigs: &[libc::c_int], block: bool) -> io::Result<()> {
    let how = if block {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    set_mask(how, sigs)
}

/// Unblocks every signal on the calling thread. The mask is inherited
/// through `fork` and `exec`: a helper an upgraded master starts before it
/// unblocks its own (see [`mask_signals`]) would keep them blocked.
pub fn clear_signal_mask() -> io::Result<()> {
    set_mask(libc::SIG_SETMASK, &[])
}

fn set_mask(how: libc::c_int, sigs: &[libc::c_int]) -> io::Result<()> {
    // SAFETY: sigset_t is plain data, emptied by sigemptyset before use;
    // the calls only change this thread's mask.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut())
    };
    match rc {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Sends `data` with `fd` attached (`SCM_RIGHTS`) on the Unix socket
/// `sock`, without blocking and without allocating (nix's `sendmsg`
/// allocates its control buffer on every call; this is the dispatch hot path).
///
/// A message this small is queued whole or not at all, so the fd always
/// travels with its line: `Ok(n)` is `data.len()`, a full socket is
/// `WouldBlock`.
pub fn send_fd(sock: RawFd, data: &[u8], fd: RawFd) -> io::Result<usize> {
    const FD_SPACE: usize = std::mem::size_of::<RawFd>();
    // Room for one cmsghdr plus one fd, aligned as cmsghdr requires.
    #[repr(C)]
    union Cmsg {
        _align: libc::cmsghdr,
        buf: [u8; 64],
    }
    let mut cmsg = Cmsg { buf: [0; 64] };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
    let (space, len) = unsafe {
        (
            libc::CMSG_SPACE(FD_SPACE as u32) as usize,
            libc::CMSG_LEN(FD_SPACE as u32) as usize,
        )
    };
    debug_assert!(space <= 64);
    // SAFETY: `cmsg` outlives the call and has `space` bytes, aligned for
    // cmsghdr; CMSG_FIRSTHDR returns a pointer into it since
    // msg_controllen >= sizeof(cmsghdr); the fd is copied into its data area.
    unsafe {
        msg.msg_control = cmsg.buf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let hdr = libc::CMSG_FIRSTHDR(&msg);
        (*hdr).cmsg_level = libc::SOL_SOCKET;
        (*hdr).cmsg_type = libc::SCM_RIGHTS;
        (*hdr).cmsg_len = len as _;
        std::ptr::copy_nonoverlapping(
            (&fd as *const RawFd).cast::<u8>(),
            libc::CMSG_DATA(hdr),
            FD_SPACE,
        );
        let n = libc::sendmsg(sock, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Sockets that own their fd for their whole life and never replace it:
/// what tokio's `AsyncFd::register_with_interest` requires.
///
/// # Safety
/// An implementor's `as_raw_fd` must name one open fd that it owns until it
/// is dropped. `unsafe` so that only this module can vouch for a type.
pub unsafe trait OwnsFd: std::os::fd::AsRawFd {}
// SAFETY: std's sockets own their fd from creation to drop.
unsafe impl OwnsFd for std::net::TcpListener {}
// SAFETY: as above.
unsafe impl OwnsFd for std::os::unix::net::UnixStream {}

/// Registers a std socket with the tokio reactor for `interest` only.
/// Dispatch mode uses it for a raw `accept` loop (an accepted connection,
/// which only passes through, is never registered with epoll) and to read
/// workers' answers without write interest (see `dispatch::handoff::Peer::chan`).
pub fn watch<T: OwnsFd>(
    sock: T,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `OwnsFd` types own their fd until dropped, and the `AsyncFd`
    // owns the socket, so the registration never outlives the fd.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(sock, interest) }
        .map_err(|e| e.into_parts().1)
}

/// Connections waiting in a listening socket's accept queue: `TCP_INFO`'s
/// `tcpi_unacked`, which the kernel fills with the queue's length for a
/// socket in LISTEN (`Recv-Q` of `ss -lnt`). One syscall, not a read of
/// `/proc/net/tcp`, which grows with every socket of the host.
pub fn accept_queue(fd: std::os::fd::BorrowedFd<'_>) -> Option<u32> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers, so all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which has
    // that many, and `fd` is open for the call (borrowed).
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    // include/net/tcp_states.h: TCP_LISTEN (libc has no constant for it).
    const LISTEN: u8 = 10;
    let filled = std::mem::offset_of!(libc::tcp_info, tcpi_unacked) + 4;
    (rc == 0 && len as usize >= filled && info.tcpi_state == LISTEN).then_some(info.tcpi_unacked)
}

/// Reuseport mode: has the kernel give the new connections of `fd`'s
/// `SO_REUSEPORT` group only to the sockets at the indices `to`, at random:
/// a classic BPF program (`SO_ATTACH_REUSEPORT_CBPF`, Linux 4.5+, no
/// privilege needed, see [`steering_program`]). The kernel keeps a group's
/// sockets in the order they began listening and fills a closed one's place
/// with the last; herd binds a slot's socket in slot order and closes only
/// the highest, so a slot's index in the group is its number, unless a
/// worker shut a socket down (see `supervise::steer`).
pub fn steer_reuseport(fd: std::os::fd::BorrowedFd<'_>, to: &[u32]) -> io::Result<()> {
    let mut prog = steering_program(to)
        .ok_or_else(|| io::Error::other(format!("cannot steer to {} sockets", to.len())))?;
    let fprog = libc::sock_fprog {
        // At most 2 + 2 × MAX_STEERED instructions.
        len: prog.len() as libc::c_ushort,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `prog`, both live for the call, and `fd`
    // is open (borrowed); the kernel copies the program.
    check(unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The most sockets [`steering_program`] picks among (the kernel takes
/// 4,096 instructions).
const MAX_STEERED: usize = 2000;

/// `random % n` (`n` = `to.len()`), then the `to` at that place: the
/// index of the socket for a new connection. `None` for no socket or more
/// than [`MAX_STEERED`].
pub fn steering_program(to: &[u32]) -> Option<Vec<libc::sock_filter>> {
    let n = u32::try_from(to.len())
        .ok()
        .filter(|_| (1..=MAX_STEERED).contains(&to.len()))?;
    let op = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let mut prog = vec![
        op(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
            0,
            0,
        ),
        op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, n, 0, 0),
    ];
    if to.iter().zip(0..).all(|(&t, i)| t == i) {
        // The first n: the remainder is the index.
        prog.push(op(libc::BPF_RET | libc::BPF_A, 0, 0, 0));
        return Some(prog);
    }
    for (i, &t) in (0..).zip(to) {
        if i + 1 < n {
            // Equal: the next instruction returns `t`; else skip it.
            prog.push(op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, i, 0, 1));
        }
        prog.push(op(libc::BPF_RET | libc::BPF_K, t, 0, 0));
    }
    Some(prog)
}

/// Ends [`steer_reuseport`]: the kernel spreads by its hash over the whole
/// group again (`SO_DETACH_REUSEPORT_BPF`, Linux 5.3+). `Ok` when the group
/// had no program.
pub fn unsteer_reuseport(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let zero: libc::c_int = 0;
    // SAFETY: the option's value is an int that lives for the call, and
    // `fd` is open (borrowed).
    match check(unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            SO_DETACH_REUSEPORT_BPF,
            (&raw const zero).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    }) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map(drop),
    }
}

// include/uapi/asm-generic/socket.h (x86, arm, riscv…); libc has them for
// Android only.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

/// The first socket systemd (or `systemd-socket-activate`) passed to this
/// process (`LISTEN_FDS`, from fd 3), when `LISTEN_PID` names this process:
/// a listening TCP socket, made close-on-exec so workers never inherit it
/// by accident. `None` when there is none for us.
pub fn inherited_listener() -> io::Result<Option<socket2::Socket>> {
    use std::os::fd::FromRawFd;
    const SD_LISTEN_FDS_START: RawFd = 3;
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let n = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !ours || n < 1 {
        return Ok(None);
    }
    for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + n {
        // None of these is for a worker. SAFETY: F_SETFD on any fd number
        // is harmless; a closed one fails with EBADF.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: fstat writes only into the zeroed struct it is given.
    let is_socket = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(SD_LISTEN_FDS_START, &mut st) == 0
            && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
    };
    if !is_socket {
        return Err(io::Error::other("LISTEN_FDS: fd 3 is not a socket"));
    }
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(None);
    }
    // SAFETY: LISTEN_PID names this process, so the service manager passed
    // fd 3 to it and nothing else in this process owns it; TAKEN makes this
    // the only owner, the Socket from here on. (Workers never see the
    // LISTEN_* variables: their environment drops them.)
    let sock = unsafe { socket2::Socket::from_raw_fd(SD_LISTEN_FDS_START) };
    let listening = sock.is_listener().unwrap_or(false);
    let tcp = sock.local_addr().ok().and_then(|a| a.as_socket()).is_some();
    if !listening || !tcp {
        std::mem::forget(sock); // not ours to close either
        return Err(io::Error::other(
            "LISTEN_FDS: fd 3 is not a listening TCP socket (ListenStream= in the .socket unit)",
        ));
    }
    Ok(Some(sock))
}

/// The path of herd's binary, as it was when the master started (a binary
/// replaced on disk since leaves `/proc/self/exe` naming the old inode).
static EXE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Remembers where herd's binary is; call first thing in `main`.
pub fn remember_exe() {
    if let Ok(p) = std::env::current_exe() {
        let _ = EXE.set(p);
    }
}

/// The binary `herd upgrade` runs: the file at the path herd started from.
pub fn exe_path() -> Option<std::path::PathBuf> {
    EXE.get().cloned().map(|p| {
        let s = p.to_string_lossy();
        match s.strip_suffix(" (deleted)") {
            Some(live) => std::path::PathBuf::from(live),
            None => p,
        }
    })
}

/// Re-executes `exe` in this process (same pid) with this process's
/// arguments and `extra` added to its environment, keeping `keep` open
/// across the exec. Returns only if the exec failed.
pub fn exec_self(exe: &std::path::Path, keep: &[RawFd], extra: &[(&str, String)]) -> io::Error {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    for &fd in keep {
        // SAFETY: clearing FD_CLOEXEC on an fd this process owns and keeps
        // open until the exec changes nothing else.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    }
    let cstr = |b: &[u8]| CString::new(b).map_err(|_| io::Error::other("a NUL in an argument"));
    let prog = match cstr(exe.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut argv = Vec::new();
    for a in std::env::args_os() {
        match cstr(a.as_bytes()) {
            Ok(c) => argv.push(c),
            Err(e) => return e,
        }
    }
    let mut env = Vec::new();
    for (k, v) in std::env::vars_os() {
        if extra.iter().any(|(ek, _)| k == *ek) {
            continue;
        }
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        if let Ok(c) = CString::new(kv) {
            env.push(c);
        }
    }
    for (k, v) in extra {
        if let Ok(c) = CString::new(format!("{k}={v}")) {
            env.push(c);
        }
    }
    match nix::unistd::execve(&prog, &argv, &env) {
        Ok(never) => match never {},
        Err(e) => io::Error::from(e),
    }
}

/// The sockets and lock a master passed to itself across `herd upgrade`'s
/// exec (`HERD_UPGRADE`, honoured only in the process it names).
pub struct Handed {
    /// The cluster's name (a derived one may have taken a `-2` suffix).
    pub name: String,
    pub listeners: Vec<socket2::Socket>,
    pub control: std::os::unix::net::UnixListener,
    pub lock: std::fs::File,
}

/// Takes what `HERD_UPGRADE` (`PID;control=FD;lock=FD;listen=FD,FD…`) says
/// this process was handed, once.
pub fn handed() -> Option<Handed> {
    use std::os::fd::FromRawFd;
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let v = std::env::var("HERD_UPGRADE").ok()?;
    let mut parts = v.split(';');
    if parts.next()?.parse::<u32>().ok()? != std::process::id() {
        return None;
    }
    let (mut control, mut lock, mut listen, mut name) = (None, None, Vec::new(), None);
    for p in parts {
        let (k, v) = p.split_once('=')?;
        match k {
            "name" => name = Some(v.to_string()),
            "control" => control = v.parse::<RawFd>().ok(),
            "lock" => lock = v.parse::<RawFd>().ok(),
            "listen" => {
                for fd in v.split(',').filter(|f| !f.is_empty()) {
                    listen.push(fd.parse::<RawFd>().ok()?);
                }
            }
            _ => {}
        }
    }
    let (control, lock, name) = (control?, lock?, name?);
    let valid = |fd: RawFd| {
        nix::fcntl::fcntl(
            // SAFETY: only asks whether the number is an open fd.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_GETFD,
        )
        .is_ok()
    };
    if !valid(control) || !valid(lock) || !listen.iter().all(|&fd| valid(fd)) {
        return None;
    }
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return None;
    }
    let keep_closed_on_exec = |fd: RawFd| {
        // SAFETY: as in `exec_self`, on an fd this process owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    };
    keep_closed_on_exec(control);
    keep_closed_on_exec(lock);
    listen.iter().for_each(|&fd| keep_closed_on_exec(fd));
    // SAFETY: HERD_UPGRADE names this very process, which set these fds up
    // for itself before its exec; nothing else here owns them, and TAKEN
    // makes each the property of exactly one value from now on.
    unsafe {
        Some(Handed {
            name,
            listeners: listen
                .into_iter()
                .map(|fd| socket2::Socket::from_raw_fd(fd))
                .collect(),
            control: std::os::unix::net::UnixListener::from_raw_fd(control),
            lock: std::fs::File::from_raw_fd(lock),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_is_nul_terminated() {
        let mut b = [b'x'; 32];
        unsafe { write_decimal(b.as_mut_ptr(), 3, 40213) };
        assert_eq!(&b[..9], b"xxx40213\0");
        unsafe { write_decimal(b.as_mut_ptr(), 0, 0) };
        assert_eq!(&b[..2], b"0\0");
    }

    #[test]
    fn nul_in_env_is_an_error() {
        let spec = ExecSpec {
            program: "/bin/true".into(),
            argv: vec!["true".into()],
            env: vec![("A".into(), "b\0c".into())],
            listen_pid: false,
            fds: vec![],
            parent: 1,
        };
        assert!(matches!(prepare(spec), Err(SysError::Nul(_))));
    }

    #[test]
    fn fd_arrives_with_its_line() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().unwrap();
        let (mut x, y) = UnixStream::pair().unwrap();
        assert_eq!(
            send_fd(a.as_raw_fd(), b"hello\n", y.as_raw_fd()).unwrap(),
            6
        );
        drop(y);
        let mut buf = [0u8; 16];
        let mut cmsg = nix::cmsg_space!([RawFd; 2]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let r = nix::sys::socket::recvmsg::<()>(
            b.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        let fds: Vec<RawFd> = r
            .cmsgs()
            .unwrap()
            .filter_map(|c| match c {
                nix::sys::socket::ControlMessageOwned::ScmRights(f) => Some(f),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(r.bytes, 6);
        assert_eq!(fds.len(), 1);
        // The received fd is the other end of x: writing to it reaches x.
        let mut got = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        got.write_all(b"ok").unwrap();
        let mut two = [0u8; 2];
        x.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"ok");
    }

    #[test]
    fn the_accept_queue_counts_connections_not_yet_accepted() {
        use std::os::fd::AsFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(super::accept_queue(l.as_fd()), Some(0));
        let addr = l.local_addr().unwrap();
        let _a = std::net::TcpStream::connect(addr).unwrap();
        let b = std::net::TcpStream::connect(addr).unwrap();
        // The server's side of a handshake may finish just after connect returns.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while super::accept_queue(l.as_fd()) != Some(2) && std::time::Instant::now() < until {
            std::thread::yield_now();
        }
        assert_eq!(super::accept_queue(l.as_fd()), Some(2));
        let (taken, _) = l.accept().unwrap();
        assert_eq!(super::accept_queue(l.as_fd()), Some(1));
        // Not a listening socket: no answer.
        assert_eq!(super::accept_queue(taken.as_fd()), None);
        assert_eq!(super::accept_queue(b.as_fd()), None);
    }
}
