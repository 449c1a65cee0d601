//! What a child runs as: its resource limits, its user and its groups.
//!
//! Three steps, each where it is safe:
//!
//! 1. **checked** when the configuration loads and at each `spawn`
//!    ([`ChildSetup::resolve`]): a limit above the broker's own hard limit,
//!    an unknown user or group, or a user or group asked of a broker that
//!    does not run as root is an error naming its key;
//! 2. **resolved** in the broker before each fork (again by
//!    [`ChildSetup::resolve`]): user-database look-ups (`getpwnam`,
//!    `getgrouplist`) allocate and take locks, so they never run in the
//!    forked child;
//! 3. **applied** in the forked child before exec ([`ChildSetup::apply`]),
//!    with system calls only (`setrlimit`, `setgroups`, `setgid`,
//!    `setuid`): async-signal-safe, no allocation.
//!
//! A user's groups are what `initgroups` would give (its primary group, or
//! `group` when set, and every group that lists it), and none of root's.
//! The group is set before the user: once the user is not root, it could
//! not change its groups any more.

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::unistd::{Gid, Group, Uid, User};
use serde::{Deserialize, Serialize};

/// The parts of a service's settings that say how its children run: what
/// [`ChildSetup::resolve`] reads. A trait, so that this module need not
/// know the whole service configuration (which is built on it).
pub trait RunAsSpec {
    /// `limits`.
    fn run_limits(&self) -> &Limits;
    /// `cwd` (`""`: the broker's).
    fn run_cwd(&self) -> &str;
    /// `user`.
    fn run_user(&self) -> Option<&UserRef>;
    /// `group`.
    fn run_group(&self) -> Option<&UserRef>;
}

/// `limits = { open_files, processes, cpu_seconds, address_space_bytes,
/// core_bytes }`: each sets both the soft and the hard limit of the child
/// (`setrlimit`); unset ones are inherited from the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// `RLIMIT_NOFILE`: open file descriptors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    /// `RLIMIT_NPROC`: processes (threads count) of the child's user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
    /// `RLIMIT_CPU`: CPU time in seconds (SIGXCPU, then SIGKILL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<u64>,
    /// `RLIMIT_AS`: virtual memory in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_space_bytes: Option<u64>,
    /// `RLIMIT_CORE`: largest core dump in bytes (0: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core_bytes: Option<u64>,
}

impl Limits {
    /// No limit set.
    pub fn is_empty(&self) -> bool {
        self.each().next().is_none()
    }

    /// Each limit set: its key, its resource and its value.
    fn each(&self) -> impl Iterator<Item = (&'static str, Resource, u64)> {
        [
            ("open_files", Resource::RLIMIT_NOFILE, self.open_files),
            ("processes", Resource::RLIMIT_NPROC, self.processes),
            ("cpu_seconds", Resource::RLIMIT_CPU, self.cpu_seconds),
            (
                "address_space_bytes",
                Resource::RLIMIT_AS,
                self.address_space_bytes,
            ),
            ("core_bytes", Resource::RLIMIT_CORE, self.core_bytes),
        ]
        .into_iter()
        .filter_map(|(key, resource, value)| value.map(|v| (key, resource, v)))
    }
}

/// A user or a group: a name (`"nobody"`) or a number (`65534`, a TOML
/// integer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UserRef {
    /// A number (uid or gid).
    Id(u32),
    /// A name in the user or group database.
    Name(String),
}

impl From<&str> for UserRef {
    fn from(name: &str) -> Self {
        Self::Name(name.to_owned())
    }
}

impl From<String> for UserRef {
    fn from(name: String) -> Self {
        Self::Name(name)
    }
}

impl From<u32> for UserRef {
    fn from(id: u32) -> Self {
        Self::Id(id)
    }
}

impl std::fmt::Display for UserRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Id(id) => write!(f, "{id}"),
            Self::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// A setting of a service that cannot be carried out, with its key
/// (`limits.open_files`, `user`, `group`, `cwd`) relative to the service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct RunAsError {
    /// The key, relative to the service (`limits.open_files`).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl RunAsError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Who the child runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ids {
    /// `None`: `group` alone, the user stays the broker's.
    uid: Option<Uid>,
    gid: Gid,
    /// The supplementary groups (never root's).
    groups: Vec<Gid>,
}

/// What a child applies to itself between fork and exec, resolved before
/// the fork.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChildSetup {
    limits: Vec<(Resource, u64)>,
    ids: Option<Ids>,
}

impl ChildSetup {
    /// Checks and resolves `spec`'s `limits`, `user`, `group` and `cwd`
    /// against this broker (its hard limits, whether it runs as root, the
    /// user and group databases, the file system).
    pub fn resolve(spec: &impl RunAsSpec) -> Result<Self, RunAsError> {
        let mut limits = Vec::new();
        for (key, resource, value) in spec.run_limits().each() {
            let key = format!("limits.{key}");
            let (_, hard) = getrlimit(resource).map_err(|e| {
                RunAsError::new(&key, format!("cannot read the broker's own limit: {e}"))
            })?;
            // RLIM_INFINITY is u64::MAX: no value is above it.
            if value > hard {
                return Err(RunAsError::new(
                    key,
                    format!(
                        "{value} is above the broker's own hard limit {hard} \
                         (a child cannot be given more than the broker has; raise the \
                         broker's limit, e.g. LimitNOFILE= under systemd, or lower this)"
                    ),
                ));
            }
            limits.push((resource, value));
        }
        let cwd = spec.run_cwd();
        if !cwd.is_empty() {
            match std::fs::metadata(cwd) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(RunAsError::new(
                        "cwd",
                        format!("{cwd:?} is not a directory"),
                    ));
                }
                Err(e) => return Err(RunAsError::new("cwd", format!("{cwd:?}: {e}"))),
            }
        }
        let ids = resolve_ids(spec.run_user(), spec.run_group())?;
        Ok(Self { limits, ids })
    }

    /// Applies the limits, then the groups, the group and the user. Runs in
    /// the forked child before exec: system calls only, nothing allocated.
    pub fn apply(&self) -> std::io::Result<()> {
        for &(resource, value) in &self.limits {
            setrlimit(resource, value, value)?;
        }
        if let Some(ids) = &self.ids {
            nix::unistd::setgroups(&ids.groups)?;
            nix::unistd::setgid(ids.gid)?;
            if let Some(uid) = ids.uid {
                nix::unistd::setuid(uid)?;
            }
        }
        Ok(())
    }

    /// Whether the child changes user or group (for the log).
    pub fn uid_gid(&self) -> Option<(Option<u32>, u32)> {
        self.ids
            .as_ref()
            .map(|ids| (ids.uid.map(Uid::as_raw), ids.gid.as_raw()))
    }
}

fn resolve_ids(user: Option<&UserRef>, group: Option<&UserRef>) -> Result<Option<Ids>, RunAsError> {
    let key = match (user, group) {
        (None, None) => return Ok(None),
        (Some(_), _) => "user",
        (None, Some(_)) => "group",
    };
    let me = nix::unistd::geteuid();
    if !me.is_root() {
        return Err(RunAsError::new(
            key,
            format!(
                "starting children as another user or group needs a broker running as root \
                 (it runs as uid {me})"
            ),
        ));
    }
    let lookup = |e: nix::Error| RunAsError::new(key, format!("user database: {e}"));
    let gid = match group {
        None => None,
        Some(UserRef::Id(id)) => Some(Gid::from_raw(*id)),
        Some(UserRef::Name(name)) => match Group::from_name(name).map_err(lookup)? {
            Some(g) => Some(g.gid),
            None => {
                return Err(RunAsError::new(
                    "group",
                    format!("no group {name:?} on this system"),
                ));
            }
        },
    };
    let user = match user {
        None => None,
        Some(UserRef::Name(name)) => match User::from_name(name).map_err(lookup)? {
            Some(u) => Some((u.uid, Some(u))),
            None => {
                return Err(RunAsError::new(
                    "user",
                    format!("no user {name:?} on this system"),
                ));
            }
        },
        Some(UserRef::Id(id)) => {
            let uid = Uid::from_raw(*id);
            Some((uid, User::from_uid(uid).map_err(lookup)?))
        }
    };
    let Some((uid, entry)) = user else {
        // `group` alone: that group, and none of root's supplementary ones.
        let gid = gid.unwrap_or_else(nix::unistd::getegid);
        return Ok(Some(Ids {
            uid: None,
            gid,
            groups: vec![gid],
        }));
    };
    let Some(entry) = entry else {
        // A bare uid with no entry: no name to find its groups by.
        let Some(gid) = gid else {
            return Err(RunAsError::new(
                "user",
                format!(
                    "uid {uid} has no entry in the user database, so no primary group: set group too"
                ),
            ));
        };
        return Ok(Some(Ids {
            uid: Some(uid),
            gid,
            groups: vec![gid],
        }));
    };
    let gid = gid.unwrap_or(entry.gid);
    let name = std::ffi::CString::new(entry.name.as_bytes())
        .map_err(|_| RunAsError::new("user", "the user's name has a NUL byte"))?;
    let groups = nix::unistd::getgrouplist(&name, gid).map_err(lookup)?;
    Ok(Some(Ids {
        uid: Some(uid),
        gid,
        groups,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service's run-as settings, built as a service's are.
    #[derive(Default)]
    struct Spec {
        limits: Limits,
        cwd: String,
        user: Option<UserRef>,
        group: Option<UserRef>,
    }

    impl Spec {
        fn limits(mut self, limits: Limits) -> Self {
            self.limits = limits;
            self
        }
        fn cwd(mut self, dir: &str) -> Self {
            self.cwd = dir.into();
            self
        }
        fn user(mut self, user: impl Into<UserRef>) -> Self {
            self.user = Some(user.into());
            self
        }
        fn group(mut self, group: impl Into<UserRef>) -> Self {
            self.group = Some(group.into());
            self
        }
    }

    impl RunAsSpec for Spec {
        fn run_limits(&self) -> &Limits {
            &self.limits
        }
        fn run_cwd(&self) -> &str {
            &self.cwd
        }
        fn run_user(&self) -> Option<&UserRef> {
            self.user.as_ref()
        }
        fn run_group(&self) -> Option<&UserRef> {
            self.group.as_ref()
        }
    }

    fn spec() -> Spec {
        Spec::default()
    }

    #[test]
    fn user_refs_read_as_names_or_numbers() {
        #[derive(Deserialize)]
        struct T {
            a: UserRef,
            b: UserRef,
        }
        let t: T = toml::from_str("a = \"nobody\"\nb = 65534").expect("toml");
        assert_eq!(t.a, UserRef::Name("nobody".into()));
        assert_eq!(t.b, UserRef::Id(65534));
    }

    #[test]
    fn a_limit_above_the_hard_limit_names_its_key() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        if hard == u64::MAX {
            return; // unlimited: nothing is above it
        }
        let s = spec().limits(Limits {
            open_files: Some(hard + 1),
            ..Limits::default()
        });
        let e = ChildSetup::resolve(&s).expect_err("above");
        assert_eq!(e.key, "limits.open_files");
        assert!(e.message.contains("hard limit"), "{e}");
        let s = spec().limits(Limits {
            open_files: Some(hard),
            core_bytes: Some(0),
            ..Limits::default()
        });
        assert_eq!(
            ChildSetup::resolve(&s).expect("at the limit").limits.len(),
            2
        );
    }

    #[test]
    fn a_missing_cwd_names_its_key() {
        let e = ChildSetup::resolve(&spec().cwd("/no/such/dir/here")).expect_err("missing");
        assert_eq!(e.key, "cwd");
        let e = ChildSetup::resolve(&spec().cwd("/etc/passwd")).expect_err("a file");
        assert!(e.message.contains("not a directory"), "{e}");
    }

    #[test]
    fn users_and_groups_resolve_or_name_their_key() {
        if !nix::unistd::geteuid().is_root() {
            let e = ChildSetup::resolve(&spec().user("nobody")).expect_err("not root");
            assert_eq!(e.key, "user");
            let e = ChildSetup::resolve(&spec().group(0u32)).expect_err("not root");
            assert_eq!(e.key, "group");
            return;
        }
        let e = ChildSetup::resolve(&spec().user("no-such-user-here")).expect_err("unknown");
        assert_eq!(
            (e.key.as_str(), e.message.contains("no user")),
            ("user", true)
        );
        let e = ChildSetup::resolve(&spec().group("no-such-group-here")).expect_err("unknown");
        assert_eq!(e.key, "group");
        let e = ChildSetup::resolve(&spec().user(4_000_000u32)).expect_err("no entry, no group");
        assert!(e.message.contains("set group too"), "{e}");
        let bare = ChildSetup::resolve(&spec().user(4_000_000u32).group(4_000_000u32)).expect("ok");
        assert_eq!(bare.uid_gid(), Some((Some(4_000_000), 4_000_000)));

        let nobody = User::from_name("nobody")
            .expect("db")
            .expect("nobody exists");
        let setup = ChildSetup::resolve(&spec().user("nobody")).expect("nobody");
        let ids = setup.ids.expect("ids");
        assert_eq!((ids.uid, ids.gid), (Some(nobody.uid), nobody.gid));
        assert!(ids.groups.contains(&nobody.gid));
        assert!(
            !ids.groups.contains(&Gid::from_raw(0)),
            "none of root's groups"
        );
    }
}
