//! Attaching the TC and XDP programs to interfaces, and taking them off.
//!
//! TC goes on clsact ingress, and its egress program (the host's own NAT
//! beside ours, see `forwarder_common::host_nat`) on clsact egress: as TCX
//! links where the kernel has TCX (6.6+), otherwise as netlink filters on
//! a clsact qdisc, which is added if missing and then removed again at
//! detach. XDP goes on as a link in the
//! mode the driver chooses. [`Attached`] remembers everything it did, so
//! that detaching (explicit or on drop) leaves nothing of ours behind.

use std::os::fd::AsFd;
use std::path::PathBuf;

use aya::Ebpf;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId,
    xdp::XdpLinkId,
};
use aya::util::KernelVersion;

use super::interfaces::Interface;
use super::{pins, qdisc};

pub const TC_PROGRAM: &str = "forwarder_tc";
pub const TC_EGRESS_PROGRAM: &str = "forwarder_tc_egress";
pub const XDP_PROGRAM: &str = "forwarder_xdp";

/// How the TC program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttach {
    /// TCX where the kernel has it, netlink otherwise.
    #[default]
    Auto,
    /// A netlink filter on clsact even where TCX exists.
    Netlink,
}

impl TcAttach {
    fn use_tcx(self) -> bool {
        match self {
            TcAttach::Netlink => false,
            TcAttach::Auto => {
                KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
            }
        }
    }
}

/// One interface's attachments.
struct OnInterface {
    interface: Interface,
    xdp: Option<XdpLinkId>,
    tc: Option<SchedClassifierLinkId>,
    tc_egress: Option<SchedClassifierLinkId>,
    /// The links when pinned (they then outlive the process).
    xdp_pinned: Option<PinnedLink>,
    tc_pinned: Option<PinnedLink>,
    tc_egress_pinned: Option<PinnedLink>,
    /// The clsact qdisc was added by us and goes away at detach.
    clsact_added: bool,
}

/// Everything attached so far. Detaches on drop (best effort).
pub struct Attached {
    on: Vec<OnInterface>,
    /// Set by `attach`; the programs live in it.
    ebpf: Option<Ebpf>,
    /// Where the links are pinned; `None`: not pinned.
    pin_dir: Option<PathBuf>,
}

impl Attached {
    /// Loads the programs of `ebpf` into the kernel.
    pub fn load_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
        for name in [TC_PROGRAM, TC_EGRESS_PROGRAM] {
            let tc: &mut SchedClassifier = program(ebpf, name)?.try_into()?;
            retry_interrupted(|| tc.load())
                .map_err(|e| anyhow::anyhow!("the kernel refused the TC program {name}: {e}"))?;
        }
        let xdp: &mut Xdp = program(ebpf, XDP_PROGRAM)?.try_into()?;
        retry_interrupted(|| xdp.load())
            .map_err(|e| anyhow::anyhow!("the kernel refused the XDP program: {e}"))?;
        Ok(())
    }

    /// Attaches TC ingress, and XDP if `with_xdp`, to every interface, or
    /// to none: on an error whatever was attached is taken off again. With
    /// `pin_dir`, the links are pinned there, replacing a dead daemon's:
    /// its TC link only once ours is attached, so no packet misses both.
    pub fn attach(
        ebpf: Ebpf,
        interfaces: &[Interface],
        mode: TcAttach,
        with_xdp: bool,
        pin_dir: Option<PathBuf>,
    ) -> anyhow::Result<Attached> {
        let mut attached = Attached {
            on: Vec::new(),
            ebpf: Some(ebpf),
            pin_dir,
        };
        let tcx = mode.use_tcx();
        for interface in interfaces {
            attached.on.push(OnInterface {
                interface: interface.clone(),
                xdp: None,
                tc: None,
                tc_egress: None,
                xdp_pinned: None,
                tc_pinned: None,
                tc_egress_pinned: None,
                clsact_added: false,
            });
            // On error `attached` drops here and detaches everything.
            attached.attach_one(tcx, with_xdp)?;
        }
        Ok(attached)
    }

    fn attach_one(&mut self, tcx: bool, with_xdp: bool) -> anyhow::Result<()> {
        let ebpf = self.ebpf.as_mut().expect("programs present until detach");
        let on = self.on.last_mut().expect("pushed by the caller");
        let name = on.interface.name.clone();
        let ifindex = on.interface.ifindex;
        let pin = |hook: &str| {
            self.pin_dir
                .as_deref()
                .map(|dir| pins::link_path(dir, hook, ifindex))
        };
        let (xdp_pin, tc_pin, egress_pin) = (pin("xdp"), pin("tc"), pin("tc-egress"));
        let mut xdp_replaced = false;
        if let Some(path) = &xdp_pin {
            // A previous daemon's XDP link (an upgrade, a crash) gets our
            // program in one step; otherwise it goes first (one XDP
            // program per interface) and TC carries its flows meanwhile.
            if with_xdp && path.exists() {
                let xdp: &mut Xdp = program(ebpf, XDP_PROGRAM)?.try_into()?;
                match super::links::replace_program(path, xdp.fd()?.as_fd()) {
                    Ok(pinned) => {
                        on.xdp_pinned = Some(pinned);
                        xdp_replaced = true;
                        tracing::info!(interface = %name, "took over the XDP hook of the previous daemon: its link runs our program now");
                    }
                    Err(e) => {
                        tracing::debug!(interface = %name, "cannot update the pinned XDP link: {e:#}")
                    }
                }
            }
            if !xdp_replaced {
                pins::detach_pinned(path)?;
            }
        }
        if with_xdp && !xdp_replaced {
            let xdp: &mut Xdp = program(ebpf, XDP_PROGRAM)?.try_into()?;
            let id = xdp
                .attach_to_if_index(ifindex, XdpMode::default())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot attach XDP to {name}: {e} (does it already have an XDP program?)"
                    )
                })?;
            match &xdp_pin {
                Some(path) => {
                    let link = FdLink::try_from(xdp.take_link(id)?)?;
                    on.xdp_pinned = Some(pins::pin_link(link, path)?);
                }
                None => on.xdp = Some(id),
            }
        }
        if !tcx {
            if tc_pin.is_some() {
                remove_stale_filters(&name)?;
            }
            on.clsact_added = qdisc::add_clsact(&name)?;
        }
        let hooks = [
            (TC_PROGRAM, TcAttachType::Ingress, &tc_pin),
            (TC_EGRESS_PROGRAM, TcAttachType::Egress, &egress_pin),
        ];
        for (program_name, hook, pin_path) in hooks {
            let tc: &mut SchedClassifier = program(ebpf, program_name)?.try_into()?;
            let (slot, pinned, label) = match hook {
                TcAttachType::Egress => (&mut on.tc_egress, &mut on.tc_egress_pinned, "TC egress"),
                _ => (&mut on.tc, &mut on.tc_pinned, "TC"),
            };
            // A previous daemon's link (an upgrade, a crash) gets our
            // program in one step.
            if tcx && let Some(path) = pin_path.as_ref().filter(|p| p.exists()) {
                match super::links::replace_program(path, tc.fd()?.as_fd()) {
                    Ok(link) => {
                        *pinned = Some(link);
                        tracing::info!(interface = %name, "took over the {label} hook of the previous daemon: its link runs our program now");
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(interface = %name, "cannot update the pinned {label} link: {e:#}")
                    }
                }
            }
            if let (TcAttachType::Egress, Some(path)) = (hook, pin_path) {
                // Two of our egress programs in a row would not know each
                // other's packets (the first clears the mark): the previous
                // daemon's goes first. Host packets of that moment are not
                // noted; new kernel flows still are.
                pins::detach_pinned(path)?;
            }
            let options = if tcx {
                TcAttachOptions::TcxOrder(LinkOrder::default())
            } else {
                TcAttachOptions::Netlink(NlOptions::default())
            };
            let id = tc
                .attach_with_options(&name, hook, options)
                .map_err(|e| anyhow::anyhow!("cannot attach TC {hook:?} to {name}: {e}"))?;
            match pin_path {
                // A netlink filter is no link: it cannot be pinned.
                Some(path) if tcx => {
                    let link = FdLink::try_from(tc.take_link(id)?)?;
                    // Ours runs now; the dead daemon's link can go.
                    if pins::detach_pinned(path)? {
                        tracing::info!(interface = %name, "took over the {label} hook of the previous daemon");
                    }
                    *pinned = Some(pins::pin_link(link, path)?);
                }
                _ => *slot = Some(id),
            }
        }
        tracing::debug!(
            interface = %name,
            "kernel path attached: TC ingress and egress ({}){}",
            if tcx { "tcx" } else { "netlink" },
            if with_xdp { " and XDP" } else { "" }
        );
        Ok(())
    }

    /// Takes everything off and unloads the programs. Reports the first
    /// failure but always tries every step.
    pub fn detach(mut self) -> anyhow::Result<()> {
        self.detach_all()
    }

    fn detach_all(&mut self) -> anyhow::Result<()> {
        let mut first_error: Option<anyhow::Error> = None;
        let mut note = |e: anyhow::Error| {
            if first_error.is_none() {
                first_error = Some(e);
            }
        };
        let Some(mut ebpf) = self.ebpf.take() else {
            return Ok(());
        };
        let program_ids: Vec<u32> = [TC_PROGRAM, TC_EGRESS_PROGRAM, XDP_PROGRAM]
            .iter()
            .filter_map(|name| ebpf.program(name)?.info().ok())
            .map(|info| info.id())
            .collect();
        for on in self.on.drain(..).rev() {
            let name = &on.interface.name;
            let gone = super::interfaces::ifindex(name) != Some(on.interface.ifindex);
            for (id, program_name) in [(on.tc, TC_PROGRAM), (on.tc_egress, TC_EGRESS_PROGRAM)] {
                if let Some(id) = id
                    && let Ok(tc) = program_as::<SchedClassifier>(&mut ebpf, program_name)
                    && let Err(e) = tc.detach(id)
                    && !gone
                {
                    note(anyhow::anyhow!(
                        "cannot detach {program_name} from {name}: {e}"
                    ));
                }
            }
            if let Some(id) = on.xdp
                && let Ok(xdp) = program_as::<Xdp>(&mut ebpf, XDP_PROGRAM)
                && let Err(e) = xdp.detach(id)
                && !gone
            {
                note(anyhow::anyhow!("cannot detach XDP from {name}: {e}"));
            }
            // Unpinned and closed, a link is detached.
            for pinned in [on.tc_pinned, on.tc_egress_pinned, on.xdp_pinned]
                .into_iter()
                .flatten()
            {
                if let Err(e) = pinned.unpin() {
                    note(anyhow::anyhow!("cannot unpin a link on {name}: {e}"));
                }
            }
            if on.clsact_added
                && !gone
                && let Err(e) = qdisc::remove_clsact(on.interface.ifindex)
            {
                note(anyhow::anyhow!(
                    "cannot remove the clsact qdisc we added to {name}: {e}"
                ));
            }
        }
        // A link a forked child still holds a reference to would stay.
        match super::links::detach_links_of(&program_ids) {
            Ok(0) => {}
            Ok(n) => tracing::debug!("{n} links of ours were still attached; detached"),
            Err(e) => note(anyhow::anyhow!(
                "cannot detach the links of our programs: {e}"
            )),
        }
        // Unloads the programs and closes the maps.
        drop(ebpf);
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Err(e) = self.detach_all() {
            tracing::warn!("kernel path: {e:#}");
        }
    }
}

/// The verifier gives up with EAGAIN when a signal arrives while it works
/// (a child exiting, say); like libbpf, try again a few times.
fn retry_interrupted(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut tries = 0;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < 5 =>
            {
                tries += 1;
                tracing::debug!("the verifier was interrupted; loading again");
            }
            other => return other,
        }
    }
}

/// Removes netlink filters of our TC program that a dead daemon left on
/// `interface` (kernels without TCX): a new one must not run behind them.
fn remove_stale_filters(interface: &str) -> anyhow::Result<()> {
    let hooks = [
        (TcAttachType::Ingress, TC_PROGRAM),
        (TcAttachType::Egress, TC_EGRESS_PROGRAM),
    ];
    for (hook, name) in hooks {
        match aya::programs::tc::qdisc_detach_program(interface, hook, name) {
            Ok(()) => {
                tracing::info!(
                    interface,
                    "removed the TC {hook:?} filter a previous daemon left"
                );
            }
            Err(aya::programs::tc::TcError::IoError(e))
                if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot remove a previous daemon's TC {hook:?} filter from {interface}: {e}"
                ));
            }
        }
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow::anyhow!("the eBPF object has no program `{name}`"))
}

fn program_as<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    Ok(program(ebpf, name)?.try_into()?)
}
