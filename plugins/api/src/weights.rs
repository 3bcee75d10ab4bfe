//! Loading and saving a plugin's weights (safetensors), strict in both directions, on the
//! device of the plugin's `VarStore` (the stage's device).

use std::collections::BTreeMap;
use std::path::Path;

use tch::{nn::VarStore, Tensor};

use crate::{PluginError, PluginResult};

/// Copies `path`'s tensors into `vs`'s variables (converting dtype and device). Every
/// variable must be in the file with its shape, and every tensor in the file must be a
/// variable; otherwise the error lists what is missing, unexpected or mis-shaped.
pub fn load_var_store(vs: &VarStore, path: &Path) -> PluginResult<()> {
    let file: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| PluginError(format!("{}: {e}", path.display())))?
        .into_iter()
        .collect();
    load_named(vs, &file, &path.display().to_string())
}

/// Copies named tensors (e.g. what `state_dict` returned, for `load_state_dict`) into `vs`'s
/// variables, strictly as [`load_var_store`] does; errors name `origin`.
pub fn load_state_into(
    vs: &VarStore,
    state: &[(String, Tensor)],
    origin: &str,
) -> PluginResult<()> {
    let named: BTreeMap<String, Tensor> = state
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    if named.len() != state.len() {
        return Err(PluginError(format!(
            "{origin}: a tensor name is given twice"
        )));
    }
    load_named(vs, &named, origin)
}

fn load_named(vs: &VarStore, file: &BTreeMap<String, Tensor>, origin: &str) -> PluginResult<()> {
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut problems = Vec::new();
    for (name, var) in &vars {
        match file.get(name) {
            None => problems.push(format!("missing `{name}` {:?}", var.size())),
            Some(t) if t.size() != var.size() => problems.push(format!(
                "`{name}`: file has {:?}, the model {:?}",
                t.size(),
                var.size()
            )),
            Some(_) => {}
        }
    }
    for (name, t) in file {
        if !vars.contains_key(name) {
            problems.push(format!("unexpected `{name}` {:?}", t.size()));
        }
    }
    if !problems.is_empty() {
        return Err(PluginError(format!(
            "{origin}: weights do not fit: {}",
            problems.join("; ")
        )));
    }
    tch::no_grad(|| -> PluginResult<()> {
        for (name, var) in &vars {
            let mut var = var.shallow_clone();
            let src = file[name]
                .f_to_kind(var.kind())?
                .f_to_device(var.device())?;
            var.f_copy_(&src)?;
        }
        Ok(())
    })
}

/// Writes named tensors (e.g. a `state_dict()`) as a safetensors file (moved to the CPU).
pub fn save_safetensors(tensors: &[(String, Tensor)], path: &Path) -> PluginResult<()> {
    let cpu = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                t.f_detach()?
                    .f_to_device(tch::Device::Cpu)?
                    .f_contiguous()?,
            ))
        })
        .collect::<PluginResult<Vec<_>>>()?;
    Tensor::write_safetensors(&cpu, path)
        .map_err(|e| PluginError(format!("{}: {e}", path.display())))
}

/// A `VarStore`'s variables sorted by name (a ready-made `state_dict`).
pub fn var_store_state_dict(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
