//! Containers from OCI runtime specs: planning (pure), capabilities,
//! cgroups, mounts and the forked setup child.

pub mod caps;
pub mod cgroup;
pub mod child;
pub mod files;
pub mod mounts;
pub mod plan;
pub mod seccomp;
pub mod shares;

#[cfg(test)]
mod tests;
