//! What the XDP accelerator needs beyond the rule tables: each rule's
//! flags by rule id (replies match no rule key), and the interfaces it may
//! redirect to.
//!
//! XDP redirects only to the interfaces the daemon attached to. A frame
//! redirected into a veth is delivered only when the veth's peer has an
//! XDP program or NAPI (GRO on); the daemon cannot check a peer in another
//! namespace, so `path: xdp` on veth needs that set up by whoever owns the
//! peer (see the README).

use aya::Ebpf;
use aya::maps::{Array, DevMapHash};
use forwarder_common::{RuleKey, RuleValue};

use super::interfaces::Interface;

/// Writes every rule's flags into `RULE_FLAGS` at its rule id.
pub fn write_rule_flags(ebpf: &mut Ebpf, rules: &[(RuleKey, RuleValue)]) -> anyhow::Result<()> {
    let mut flags: Array<_, u32> = Array::try_from(map(ebpf, "RULE_FLAGS")?)?;
    for (_, value) in rules {
        flags.set(value.rule_id, value.flags, 0)?;
    }
    Ok(())
}

/// Lets XDP redirect to `interfaces`.
pub fn write_egress(ebpf: &mut Ebpf, interfaces: &[Interface]) -> anyhow::Result<()> {
    let mut egress = DevMapHash::try_from(map(ebpf, "XDP_EGRESS")?)?;
    for i in interfaces {
        egress
            .insert(i.ifindex, i.ifindex, None, 0)
            .map_err(|e| anyhow::anyhow!("cannot let XDP redirect to {}: {e}", i.name))?;
    }
    Ok(())
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow::anyhow!("the eBPF object has no map `{name}`"))
}
