#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod seccomp;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod sys;
