//! Attaching the TC and XDP programs to interfaces, and taking them off.
//!
//! TC goes on clsact ingress: as a TCX link where the kernel has TCX (6.6+),
//! otherwise as a netlink filter on a clsact qdisc, which is added if
//! missing and then removed again at detach. XDP goes on as a link in the
//! mode the driver chooses. [`Attached`] remembers everything it did, so
//! that detaching (explicit or on drop) leaves nothing of ours behind.

use aya::Ebpf;
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId,
    xdp::XdpLinkId,
};
use aya::util::KernelVersion;

use super::interfaces::Interface;
use super::qdisc;

pub const TC_PROGRAM: &str = "forwarder_tc";
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
    /// The clsact qdisc was added by us and goes away at detach.
    clsact_added: bool,
}

/// Everything attached so far. Detaches on drop (best effort).
pub struct Attached {
    on: Vec<OnInterface>,
    /// Set by `attach`; the programs live in it.
    ebpf: Option<Ebpf>,
}

impl Attached {
    /// Loads both programs of `ebpf` into the kernel.
    pub fn load_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
        let tc: &mut SchedClassifier = program(ebpf, TC_PROGRAM)?.try_into()?;
        tc.load()
            .map_err(|e| anyhow::anyhow!("the kernel refused the TC program: {e}"))?;
        let xdp: &mut Xdp = program(ebpf, XDP_PROGRAM)?.try_into()?;
        xdp.load()
            .map_err(|e| anyhow::anyhow!("the kernel refused the XDP program: {e}"))?;
        Ok(())
    }

    /// Attaches TC ingress, and XDP if `with_xdp`, to every interface, or
    /// to none: on an error whatever was attached is taken off again.
    pub fn attach(
        ebpf: Ebpf,
        interfaces: &[Interface],
        mode: TcAttach,
        with_xdp: bool,
    ) -> anyhow::Result<Attached> {
        let mut attached = Attached {
            on: Vec::new(),
            ebpf: Some(ebpf),
        };
        let tcx = mode.use_tcx();
        for interface in interfaces {
            attached.on.push(OnInterface {
                interface: interface.clone(),
                xdp: None,
                tc: None,
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
        if with_xdp {
            let xdp: &mut Xdp = program(ebpf, XDP_PROGRAM)?.try_into()?;
            on.xdp = Some(
                xdp.attach_to_if_index(on.interface.ifindex, XdpMode::default())
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot attach XDP to {name}: {e} (does it already have an XDP program?)"
                        )
                    })?,
            );
        }
        let tc: &mut SchedClassifier = program(ebpf, TC_PROGRAM)?.try_into()?;
        let options = if tcx {
            TcAttachOptions::TcxOrder(LinkOrder::default())
        } else {
            on.clsact_added = qdisc::add_clsact(&name)?;
            TcAttachOptions::Netlink(NlOptions::default())
        };
        on.tc = Some(
            tc.attach_with_options(&name, TcAttachType::Ingress, options)
                .map_err(|e| anyhow::anyhow!("cannot attach TC ingress to {name}: {e}"))?,
        );
        tracing::debug!(
            interface = %name,
            "kernel path attached: TC ingress ({}){}",
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
        let program_ids: Vec<u32> = [TC_PROGRAM, XDP_PROGRAM]
            .iter()
            .filter_map(|name| ebpf.program(name)?.info().ok())
            .map(|info| info.id())
            .collect();
        for on in self.on.drain(..).rev() {
            let name = &on.interface.name;
            let gone = super::interfaces::ifindex(name) != Some(on.interface.ifindex);
            if let Some(id) = on.tc
                && let Ok(tc) = program_as::<SchedClassifier>(&mut ebpf, TC_PROGRAM)
                && let Err(e) = tc.detach(id)
                && !gone
            {
                note(anyhow::anyhow!("cannot detach TC from {name}: {e}"));
            }
            if let Some(id) = on.xdp
                && let Ok(xdp) = program_as::<Xdp>(&mut ebpf, XDP_PROGRAM)
                && let Err(e) = xdp.detach(id)
                && !gone
            {
                note(anyhow::anyhow!("cannot detach XDP from {name}: {e}"));
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
