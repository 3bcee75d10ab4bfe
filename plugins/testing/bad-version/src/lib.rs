//! Test plugin: declares a plugin API version the host does not speak (and a foreign rustc
//! version). The host must refuse it from the declaration alone: its register function
//! aborts the process, so a host that called it would kill the test run.

use lavit_plugin_api::{PluginDeclaration, PluginResult, Registrar, StaticStr, API_VERSION};

fn register(_: &mut Registrar) -> PluginResult<()> {
    eprintln!("bad-version plugin: register called despite the version mismatch");
    std::process::abort()
}

/// The declaration of a plugin built against API version `API_VERSION + 1000`.
#[unsafe(no_mangle)]
pub static LAVIT_PLUGIN_DECLARATION: PluginDeclaration = PluginDeclaration {
    api_version: API_VERSION + 1000,
    rustc_version: StaticStr::new("rustc 0.0.0-bad-version"),
    ..PluginDeclaration::new("bad-version", "0.0.0", register)
};
