//! herd's Node preload module: shipped inside the binary, written to the
//! master's run directory and named in the workers' `NODE_OPTIONS`, so an
//! unmodified `server.listen(3000)` takes part in every mode (see
//! `node/preload.js` for what it does).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The module's source.
pub const PRELOAD: &str = include_str!("../node/preload.js");

/// Writes the module into `dir`; returns its path.
pub fn write_shim(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join("herd-preload.js");
    std::fs::write(&path, PRELOAD)?;
    Ok(path)
}

/// `NODE_OPTIONS` with `--require <path>` ahead of what the workers would
/// otherwise get (`--env NODE_OPTIONS=…`, else herd's own environment).
pub fn node_options(path: &Path, env: &[(String, String)]) -> OsString {
    let given = crate::config::worker_var(env, "NODE_OPTIONS");
    // Node splits NODE_OPTIONS like a shell: quote the path.
    let quoted = path
        .to_string_lossy()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    let mut opts = OsString::from(format!("--require \"{quoted}\""));
    if let Some(g) = given.filter(|g| !g.is_empty()) {
        opts.push(" ");
        opts.push(g);
    }
    opts
}

/// `BUN_OPTIONS` with `--preload=<path>` ahead of the workers' own, for
/// Bun, which reads no `NODE_OPTIONS` but runs the same module. Bun splits
/// it on spaces and knows no quotes: a path with white space gets none.
/// (`--preload <path>`, two words, made `bun run SCRIPT` print its usage.)
pub fn bun_options(path: &Path, env: &[(String, String)]) -> Option<OsString> {
    let path = path.to_str().filter(|p| !p.contains(char::is_whitespace))?;
    let mut opts = OsString::from(format!("--preload={path}"));
    if let Some(g) = crate::config::worker_var(env, "BUN_OPTIONS").filter(|g| !g.is_empty()) {
        opts.push(" ");
        opts.push(g);
    }
    Some(opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_quote_the_path_and_keep_the_users() {
        let env = vec![(
            "NODE_OPTIONS".to_string(),
            "--max-old-space-size=64".to_string(),
        )];
        let o = node_options(Path::new("/run/a b/herd-preload.js"), &env);
        assert_eq!(
            o,
            "--require \"/run/a b/herd-preload.js\" --max-old-space-size=64"
        );
    }

    #[test]
    fn bun_options_keep_the_users_and_skip_a_path_with_spaces() {
        let env = vec![("BUN_OPTIONS".to_string(), "--smol".to_string())];
        let o = bun_options(Path::new("/run/herd/app/herd-preload.js"), &env);
        assert_eq!(
            o.as_deref(),
            Some("--preload=/run/herd/app/herd-preload.js --smol".as_ref())
        );
        assert_eq!(
            bun_options(Path::new("/run/a b/herd-preload.js"), &env),
            None
        );
    }
}
