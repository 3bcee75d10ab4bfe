//! The command line's own surface: `--version` and shell completions.

use std::process::Command;

fn lavit(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lavit"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn version_and_completions() {
    let (ok, out, _) = lavit(&["--version"]);
    assert!(ok);
    assert_eq!(out.trim(), format!("lavit {}", env!("CARGO_PKG_VERSION")));
    for (shell, needle) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef lavit"),
        ("fish", "complete -c lavit"),
    ] {
        let (ok, out, err) = lavit(&["completions", shell]);
        assert!(ok, "{shell}: {err}");
        assert!(out.contains(needle), "{shell}: {out}");
        // Every subcommand is offered.
        for sub in ["serve", "generate", "caption", "tokenize", "completions"] {
            assert!(out.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let (ok, _, err) = lavit(&["completions", "tcsh"]);
    assert!(!ok);
    assert!(err.contains("tcsh") && err.contains("bash"), "{err}");
}
