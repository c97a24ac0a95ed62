//! The interfaces XDP may send frames out of (`XDP_EGRESS`): those the
//! daemon serves that take redirected frames now. A veth takes them only
//! while its peer (often in another namespace, out of the daemon's reach)
//! has GRO on or an XDP program; otherwise it would drop them. So the set
//! is the kernel's answer at start, asked again while the daemon runs: an
//! interface leaves it when its peer stops taking frames and comes back
//! when it starts. Frames for an interface outside it go up to TC, whose
//! redirect every interface takes; only the XDP speed-up is lost.

use std::time::Duration;

use aya::maps::{DevMapHash, MapData};
use tokio::task::JoinHandle;

use super::interfaces::Interface;
use super::xdp_features::NetdevFamily;

/// How often the kernel is asked again.
const EVERY: Duration = Duration::from_millis(250);

pub struct Egress {
    map: DevMapHash<MapData>,
    /// `None` on kernels without the `netdev` family (before 6.3): every
    /// interface is let in, as nothing can be asked.
    netdev: Option<NetdevFamily>,
    /// Each served interface and whether it is in the map.
    interfaces: Vec<(Interface, bool)>,
}

impl Egress {
    /// Lets XDP send out of the interfaces that take redirected frames now.
    pub fn start(map: DevMapHash<MapData>, interfaces: &[Interface]) -> anyhow::Result<Egress> {
        let netdev = match NetdevFamily::open() {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::debug!("cannot ask the kernel which interfaces take XDP frames: {e}");
                None
            }
        };
        let mut egress = Egress {
            map,
            netdev,
            interfaces: interfaces.iter().map(|i| (i.clone(), false)).collect(),
        };
        for n in 0..egress.interfaces.len() {
            if egress.takes(n).unwrap_or(true) {
                egress.let_in(n)?;
            } else {
                tracing::warn!(
                    "{}",
                    refusal(&egress.interfaces[n].0, "flows out of it go by TC")
                );
            }
        }
        Ok(egress)
    }

    /// Keeps the map in step with the kernel's answers, on the current
    /// tokio runtime; `None` where nothing can be asked.
    pub fn spawn(mut self) -> Option<JoinHandle<()>> {
        self.netdev.as_ref()?;
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            loop {
                tick.tick().await;
                self.follow();
            }
        }))
    }

    /// One round of asking: interfaces whose answer changed move in or out.
    fn follow(&mut self) {
        for n in 0..self.interfaces.len() {
            // An interface that cannot be asked (gone) stays as it is.
            let Ok(takes) = self.takes(n) else { continue };
            let (iface, in_map) = &self.interfaces[n];
            if takes == *in_map {
                continue;
            }
            if takes {
                match self.let_in(n) {
                    Ok(()) => tracing::info!(
                        "{} takes XDP frames again: XDP sends its flows' frames out of it",
                        self.interfaces[n].0.name
                    ),
                    Err(e) => tracing::warn!("{e:#}"),
                }
            } else {
                let removed = self.map.remove(iface.ifindex);
                tracing::warn!(
                    "{}{}",
                    refusal(iface, "flows out of it go by TC from now on"),
                    match removed {
                        Ok(()) => String::new(),
                        Err(e) => format!(" (but it could not be taken out of XDP_EGRESS: {e})"),
                    }
                );
                self.interfaces[n].1 = false;
            }
        }
    }

    fn takes(&mut self, n: usize) -> std::io::Result<bool> {
        match &mut self.netdev {
            Some(netdev) => netdev.takes_xdp_redirects(self.interfaces[n].0.ifindex),
            None => Ok(true),
        }
    }

    fn let_in(&mut self, n: usize) -> anyhow::Result<()> {
        let (iface, in_map) = &mut self.interfaces[n];
        self.map
            .insert(iface.ifindex, iface.ifindex, None, 0)
            .map_err(|e| anyhow::anyhow!("cannot let XDP send out of {}: {e}", iface.name))?;
        *in_map = true;
        Ok(())
    }
}

fn refusal(iface: &Interface, consequence: &str) -> String {
    format!(
        "{} takes no XDP frames now (a veth takes them only while its peer has GRO on, \
         `ethtool -K PEER gro on`, or an XDP program): {consequence}",
        iface.name
    )
}
