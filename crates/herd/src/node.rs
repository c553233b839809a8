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
}
