//! herd's Perl preload: shipped inside the binary, written to the master's
//! run directory and loaded by a Perl worker of the `shared` and `reuseport`
//! modes through `PERL5OPT`, so that Starman and Mojolicious' daemon drain
//! their clients when herd stops them (see `perl/Herd/Preload.pm`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The module's source.
pub const PRELOAD: &str = include_str!("../perl/Herd/Preload.pm");

/// The option that loads it.
const LOAD: &str = "-MHerd::Preload";

/// Writes the module into `dir/perl/Herd`; returns `dir/perl`, the
/// directory that goes on `PERL5LIB`.
pub fn write_shim(dir: &Path) -> std::io::Result<PathBuf> {
    let dir = dir.join("perl");
    std::fs::create_dir_all(dir.join("Herd"))?;
    std::fs::write(dir.join("Herd").join("Preload.pm"), PRELOAD)?;
    Ok(dir)
}

/// `PERL5LIB` and `PERL5OPT` with the preload ahead of what the workers
/// would otherwise get (`--env …`, else herd's own environment).
pub fn perl_env(dir: &Path, env: &[(String, String)]) -> (OsString, OsString) {
    let ahead = |first: &std::ffi::OsStr, name: &str, sep: &str| {
        let mut value = first.to_owned();
        if let Some(given) = crate::config::worker_var(env, name).filter(|g| !g.is_empty()) {
            value.push(sep);
            value.push(given);
        }
        value
    };
    (
        ahead(dir.as_os_str(), "PERL5LIB", ":"),
        ahead(LOAD.as_ref(), "PERL5OPT", " "),
    )
}

/// `perl`, `perl5.36.0`: the Perl interpreter.
pub fn is_perl(program: &Path) -> bool {
    crate::config::is_versioned(program, "perl")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preload_goes_first_and_the_users_values_stay() {
        let env = vec![
            ("PERL5LIB".to_string(), "/srv/lib".to_string()),
            ("PERL5OPT".to_string(), "-Mstrict".to_string()),
        ];
        let (lib, opt) = perl_env(Path::new("/run/h/perl"), &env);
        assert_eq!(lib, "/run/h/perl:/srv/lib");
        assert_eq!(opt, "-MHerd::Preload -Mstrict");
        assert!(is_perl(Path::new("/usr/bin/perl")));
        assert!(is_perl(Path::new("perl5.36.0")));
        assert!(!is_perl(Path::new("/usr/bin/perldoc")));
        assert!(!is_perl(Path::new("/usr/bin/starman")));
    }
}
