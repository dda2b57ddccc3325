//! Telling the disk's frontend that its config space changed (`daxd resize`).

use std::io;
use std::sync::Mutex;

use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

use daxd_registry::OwnerId;

/// Tells the disk's frontend that the device's config space changed (a disk grown by
/// `daxd resize`): `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` over the backend channel of the
/// connection that last set one up (during a migration, the destination's, which the
/// guest runs on from then on), if there is one. QEMU then reads the config space again
/// and interrupts the guest, which sees the new capacity.
#[derive(Default)]
pub struct ConfigNotifier {
    channel: Mutex<Option<(OwnerId, Backend)>>,
}

impl std::fmt::Debug for ConfigNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let connected = self.channel.lock().map(|c| c.is_some()).unwrap_or(false);
        f.debug_struct("ConfigNotifier")
            .field("channel", &connected)
            .finish()
    }
}

impl ConfigNotifier {
    pub(crate) fn set(&self, connection: OwnerId, channel: Backend) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = Some((connection, channel));
    }

    /// `connection` ended: its channel, if the current one, is gone with it.
    pub(crate) fn ended(&self, connection: OwnerId) {
        let mut channel = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        if channel
            .as_ref()
            .is_some_and(|(owner, _)| *owner == connection)
        {
            *channel = None;
        }
    }

    /// Sends the config change and waits for the frontend's reply (with `REPLY_ACK`);
    /// `Ok(false)` when there is no backend channel to send it on (no frontend, or one
    /// that did not negotiate `BACKEND_REQ`: it reads the new config space when it next
    /// asks). This can wait as long as the frontend takes to answer, so callers that must
    /// not block run it on a thread of its own.
    pub fn config_changed(&self) -> io::Result<bool> {
        let channel = self
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, channel)| channel.clone());
        match channel {
            Some(channel) => channel.handle_config_change().map(|_| true),
            None => Ok(false),
        }
    }
}
