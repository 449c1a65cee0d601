//! Where a process is in its life: shared by `ListProcesses` (the broker's
//! RPCs) and the stats reply, so neither has to import the other.

use serde::{Deserialize, Serialize};

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessStatus {
    /// Spawned, waiting for its `ready` event.
    Starting,
    /// Routable.
    Ready,
    /// Asked to stop; draining.
    Stopping,
    /// Stopped on request; will not be restarted.
    Stopped,
    /// Exited; a restart is scheduled (backoff).
    Restarting,
    /// Exited and out of restarts (`max_restarts` spent).
    Failed,
}

impl ProcessStatus {
    /// The name used on the wire and in stats (`ready`, `failed`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Restarting => "restarting",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ProcessStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
