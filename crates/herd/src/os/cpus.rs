//! How many CPUs this process may really use: the affinity mask, capped by
//! any cgroup v1/v2 CPU quota on the way up the process's cgroup tree, so a
//! container limited to 2 CPUs gets 2 workers and not the host's 64.

use std::path::{Path, PathBuf};

/// Usable CPUs, at least 1. A fractional quota is rounded up (1.5 CPUs → 2).
pub fn usable() -> usize {
    let affinity = affinity_count()
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let quota = cgroup_quota(&mountinfo, &cgroup, Path::new("/"));
    combine(affinity, quota)
}

fn combine(affinity: usize, quota: Option<f64>) -> usize {
    let cap = quota.map_or(usize::MAX, |q| q.ceil().max(1.0) as usize);
    affinity.min(cap).max(1)
}

fn affinity_count() -> Option<usize> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    let n = (0..nix::sched::CpuSet::count())
        .filter(|&i| set.is_set(i).unwrap_or(false))
        .count();
    (n > 0).then_some(n)
}

/// The tightest CPU quota (in CPUs) over every cgroup hierarchy holding a
/// CPU controller; `root` prefixes mount points so tests can use a fake tree.
fn cgroup_quota(mountinfo: &str, cgroup: &str, root: &Path) -> Option<f64> {
    let mut best: Option<f64> = None;
    for line in mountinfo.lines() {
        let Some(mount) = parse_mount(line) else {
            continue;
        };
        let own = cgroup.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            let hit = if mount.v2 {
                ctrls.is_empty()
            } else {
                ctrls.split(',').any(|c| c == "cpu")
            };
            hit.then_some(path)
        });
        let Some(own) = own else { continue };
        // Inside a cgroup namespace the mount root is where our path starts.
        let rel = Path::new(own)
            .strip_prefix(&mount.root)
            .unwrap_or(Path::new(""))
            .to_path_buf();
        let top = root.join(mount.point.strip_prefix("/").unwrap_or(&mount.point));
        let mut dir: PathBuf = top.join(rel);
        loop {
            let q = if mount.v2 {
                read_v2(&dir)
            } else {
                read_v1(&dir)
            };
            if let Some(q) = q {
                best = Some(best.map_or(q, |b: f64| b.min(q)));
            }
            if dir == top || !dir.pop() || !dir.starts_with(&top) {
                break;
            }
        }
    }
    best
}

struct Mount {
    root: PathBuf,
    point: PathBuf,
    v2: bool,
}

fn parse_mount(line: &str) -> Option<Mount> {
    let (pre, post) = line.split_once(" - ")?;
    let pre: Vec<&str> = pre.split(' ').collect();
    let post: Vec<&str> = post.split(' ').collect();
    let fstype = *post.first()?;
    let v2 = match fstype {
        "cgroup2" => true,
        "cgroup" if post.get(2)?.split(',').any(|o| o == "cpu") => false,
        _ => return None,
    };
    Some(Mount {
        root: PathBuf::from(unescape(pre.get(3)?)),
        point: PathBuf::from(unescape(pre.get(4)?)),
        v2,
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn read_v2(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("cpu.max")).ok()?;
    let mut it = text.split_whitespace();
    let quota = it.next()?.parse::<f64>().ok()?; // "max" fails here: no limit
    let period = it.next()?.parse::<f64>().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

fn read_v1(dir: &Path) -> Option<f64> {
    let read = |f: &str| -> Option<f64> {
        std::fs::read_to_string(dir.join(f))
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
    };
    let quota = read("cpu.cfs_quota_us")?;
    let period = read("cpu.cfs_period_us")?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("herd-cpus-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn write(p: PathBuf, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn v2_quota_on_an_ancestor_counts() {
        let root = tree("v2");
        write(
            root.join("sys/fs/cgroup/app.slice/cpu.max"),
            "250000 100000\n",
        );
        write(
            root.join("sys/fs/cgroup/app.slice/web/cpu.max"),
            "max 100000\n",
        );
        let mi = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let cg = "0::/app.slice/web\n";
        assert_eq!(cgroup_quota(mi, cg, &root), Some(2.5));
        assert_eq!(combine(64, cgroup_quota(mi, cg, &root)), 3);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn v1_quota_inside_a_namespaced_mount() {
        let root = tree("v1");
        write(root.join("sys/fs/cgroup/cpu/cpu.cfs_quota_us"), "200000\n");
        write(root.join("sys/fs/cgroup/cpu/cpu.cfs_period_us"), "100000\n");
        let mi = "40 30 0:30 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu,cpuacct\n\
                  41 30 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let cg = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n";
        assert_eq!(cgroup_quota(mi, cg, &root), Some(2.0));
        assert_eq!(combine(64, Some(2.0)), 2);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn no_quota_means_affinity() {
        let root = tree("none");
        write(root.join("sys/fs/cgroup/cpu.max"), "max 100000\n");
        let mi = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup_quota(mi, "0::/\n", &root), None);
        assert_eq!(combine(4, None), 4);
        assert_eq!(combine(4, Some(0.2)), 1);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn this_machine_has_at_least_one() {
        assert!(usable() >= 1);
    }
}
