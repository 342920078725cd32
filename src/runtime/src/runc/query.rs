//! `husk state` and `husk list`: runc's output formats.

use std::path::Path;

use serde::Serialize;

use super::store::{self, status_of, Container, ContainerState};
use crate::RuntimeError;

/// The OCI version husk's state reports.
pub const OCI_VERSION: &str = "1.2.0";

/// runc's state JSON (the OCI state plus rootfs, created and owner).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateJson {
    /// OCI version.
    pub oci_version: String,
    /// Container id.
    pub id: String,
    /// The VMM process's pid, 0 once stopped.
    pub pid: i32,
    /// created, running or stopped.
    pub status: String,
    /// Bundle path.
    pub bundle: String,
    /// Root filesystem path.
    pub rootfs: String,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Owner (empty: root).
    pub owner: String,
    /// The bundle's annotations.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

fn to_json(s: &ContainerState) -> StateJson {
    let status = status_of(s);
    StateJson {
        oci_version: OCI_VERSION.into(),
        id: s.id.clone(),
        pid: if status == store::Status::Stopped {
            0
        } else {
            s.pid
        },
        status: status.to_string(),
        bundle: s.bundle.display().to_string(),
        rootfs: s.rootfs.display().to_string(),
        created: s.created.clone(),
        owner: String::new(),
        annotations: s.annotations.clone(),
    }
}

/// `husk state ID`: the state JSON, indented as runc prints it.
pub fn state(root: &Path, id: &str) -> Result<String, RuntimeError> {
    let c = Container::open(root, id)?;
    let j = to_json(c.state()?);
    serde_json::to_string_pretty(&j).map_err(|e| RuntimeError::Invalid(e.to_string()))
}

/// `husk list`: a table, JSON (`json`), or ids only (`quiet`).
pub fn list(root: &Path, format: &str, quiet: bool) -> Result<String, RuntimeError> {
    let all: Vec<StateJson> = store::list(root)?.iter().map(to_json).collect();
    if quiet {
        return Ok(all.iter().map(|s| format!("{}\n", s.id)).collect());
    }
    match format {
        "json" => serde_json::to_string(&all)
            .map(|s| s + "\n")
            .map_err(|e| RuntimeError::Invalid(e.to_string())),
        "table" => {
            let mut rows = vec![[
                "ID".to_owned(),
                "PID".into(),
                "STATUS".into(),
                "BUNDLE".into(),
                "CREATED".into(),
                "OWNER".into(),
            ]];
            for s in &all {
                rows.push([
                    s.id.clone(),
                    s.pid.to_string(),
                    s.status.clone(),
                    s.bundle.clone(),
                    s.created.clone(),
                    "root".into(),
                ]);
            }
            let mut widths = [0usize; 6];
            for r in &rows {
                for (w, cell) in widths.iter_mut().zip(r) {
                    *w = (*w).max(cell.len());
                }
            }
            let mut out = String::new();
            for r in &rows {
                let line: Vec<String> = r
                    .iter()
                    .zip(widths)
                    .map(|(cell, w)| format!("{cell:<w$}"))
                    .collect();
                out += line.join("   ").trim_end();
                out.push('\n');
            }
            Ok(out)
        }
        other => Err(RuntimeError::Invalid(format!(
            "invalid format option {other:?}: table or json"
        ))),
    }
}
