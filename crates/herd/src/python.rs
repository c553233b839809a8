//! herd's Python preload: shipped inside the binary, written to the
//! master's run directory and put first on the workers' `PYTHONPATH`, so
//! an unmodified app whose code names its port (`app.run(port=5000)`)
//! takes part in proxy mode, and Python servers stop without failing
//! clients or skipping the app's shutdown (see `python/sitecustomize.py`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The module's source.
pub const PRELOAD: &str = include_str!("../python/sitecustomize.py");

/// Writes the module into `dir/python`; returns that directory.
pub fn write_shim(dir: &Path) -> std::io::Result<PathBuf> {
    let dir = dir.join("python");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("sitecustomize.py"), PRELOAD)?;
    Ok(dir)
}

/// `PYTHONPATH` with `dir` ahead of what the workers would otherwise get
/// (`--env PYTHONPATH=…`, else herd's own environment).
pub fn python_path(dir: &Path, env: &[(String, String)]) -> OsString {
    let given = crate::config::worker_var(env, "PYTHONPATH");
    let mut path = dir.as_os_str().to_owned();
    if let Some(g) = given.filter(|g| !g.is_empty()) {
        path.push(":");
        path.push(g);
    }
    path
}

/// `python`, `python3`, `python3.12`: a program whose scripts herd's
/// preload can reach.
pub fn is_python(program: &Path) -> bool {
    crate::config::is_versioned(program, "python")
}

/// Whether `python [OPTIONS] SCRIPT …` runs a script, not a module (`-m`)
/// or a string (`-c`): a module such as uvicorn or gunicorn reads its port
/// from variables herd sets, and may bind outside Python's socket module
/// (uvloop), so it keeps `PORT`.
pub fn runs_script(command: &[OsString]) -> bool {
    let mut words = command.iter().skip(1).filter_map(|w| w.to_str());
    while let Some(w) = words.next() {
        match w {
            "-X" | "-W" => {
                words.next();
            }
            w if w.starts_with("-m") || w.starts_with("-c") || w == "-" => return false,
            w if w.starts_with('-') => {}
            _ => return true,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preload_goes_first_and_the_users_path_stays() {
        let env = vec![("PYTHONPATH".to_string(), "/srv/lib".to_string())];
        assert_eq!(
            python_path(Path::new("/run/h/python"), &env),
            "/run/h/python:/srv/lib"
        );
        assert!(is_python(Path::new("/usr/bin/python3.11")));
        assert!(is_python(Path::new("python")));
        assert!(!is_python(Path::new("/usr/bin/python3-config")));
        assert!(!is_python(Path::new("/usr/bin/ipython")));
    }

    #[test]
    fn a_script_is_told_from_a_module_or_a_string() {
        let c = |words: &[&str]| runs_script(&words.iter().map(OsString::from).collect::<Vec<_>>());
        assert!(c(&["python3", "app.py"]));
        assert!(c(&["python3", "-u", "-X", "dev", "manage.py", "runserver"]));
        assert!(!c(&["python3", "-m", "uvicorn", "main:app"]));
        assert!(!c(&["python3", "-mhttp.server"]));
        assert!(!c(&["python3", "-c", "print(1)"]));
        assert!(!c(&["python3"]));
    }
}
