//! What the XDP accelerator needs beyond the rule tables: each rule's
//! flags by rule id (replies match no rule key). The interfaces it may send
//! out of are `xdp_egress`'s.

use aya::Ebpf;
use aya::maps::Array;
use forwarder_common::{RuleKey, RuleValue};

/// Writes every rule's flags into `RULE_FLAGS` at its rule id.
pub fn write_rule_flags(ebpf: &mut Ebpf, rules: &[(RuleKey, RuleValue)]) -> anyhow::Result<()> {
    let mut flags: Array<_, u32> = Array::try_from(map(ebpf, "RULE_FLAGS")?)?;
    for (_, value) in rules {
        flags.set(value.rule_id, value.flags, 0)?;
    }
    Ok(())
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow::anyhow!("the eBPF object has no map `{name}`"))
}
