//! Does the host's firewall filter a bridge's traffic? Looked at, never changed.
//!
//! Traffic between two ports of a Linux bridge is switched, not routed: it needs no IP
//! forwarding and meets no IP firewall, unless br_netfilter is active. With
//! `net.bridge.bridge-nf-call-iptables = 1` (or the bridge's own `nf_call_iptables`) bridged
//! IPv4 packets also pass the hooks of the `ip`/`inet` families, including FORWARD: iptables'
//! FORWARD chain (iptables-nft shows up as nftables chains; iptables-legacy in
//! /proc/net/ip_tables_names) and nftables chains on the forward hook. nftables chains of the
//! `bridge` family see bridged traffic in any case.

use super::ip::{self, Ns};
use super::Bridge;
use crate::error::Result;
use serde_json::Value;
use std::process::{Command, Stdio};

/// Sentences naming each host setting that filters (or may filter) traffic on `bridge`.
pub(crate) fn forward_filtering(bridge: &Bridge) -> Result<Vec<String>> {
    let sysctl = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    let own = ip::link(Ns::Host, &bridge.name, "inspecting the bridge")?
        .and_then(|l| l.linkinfo)
        .and_then(|i| i.info_data)
        .and_then(|d| d.get("nf_call_iptables").and_then(Value::as_u64))
        == Some(1);
    let call_iptables = sysctl || own;
    let mut found = Vec::new();
    match Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => found.extend(nft_findings(
            &String::from_utf8_lossy(&out.stdout),
            &bridge.name,
            call_iptables,
        )),
        _ => found.push(format!(
            "nftables forward chains were not inspected (`nft -j list ruleset` did not run; \
             Debian package nftables): check that the host firewall lets traffic on {} pass",
            bridge.name
        )),
    }
    if call_iptables {
        let legacy = std::fs::read_to_string("/proc/net/ip_tables_names").unwrap_or_default();
        if legacy.lines().any(|t| t == "filter") {
            found.push(format!(
                "the legacy iptables filter table is loaded and bridge-nf-call-iptables sends \
                 traffic bridged on {} through its FORWARD chain: check `iptables-legacy -S \
                 FORWARD` lets it pass",
                bridge.name
            ));
        }
    }
    Ok(found)
}

/// Findings from the JSON of `nft -j list ruleset`: chains on the forward hook that bridged
/// traffic passes, those that drop by default, and those with rules that might drop it.
fn nft_findings(json: &str, bridge: &str, call_iptables: bool) -> Vec<String> {
    let Ok(doc) = serde_json::from_str::<Value>(json) else {
        return vec![format!(
            "the output of `nft -j list ruleset` could not be read: check that the host \
             firewall lets traffic on {bridge} pass"
        )];
    };
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut found = Vec::new();
    for chain in items.iter().filter_map(|i| i.get("chain")) {
        let family = field(chain, "family");
        let applies = match family.as_str() {
            "bridge" => true,
            "ip" | "inet" => call_iptables,
            _ => false,
        };
        if field(chain, "hook") != "forward" || !applies {
            continue;
        }
        let (table, name) = (field(chain, "table"), field(chain, "name"));
        let why = if family == "bridge" {
            format!("traffic bridged on {bridge} passes it")
        } else {
            format!("bridge-nf-call-iptables sends IPv4 traffic bridged on {bridge} through it")
        };
        let rules = items
            .iter()
            .filter_map(|i| i.get("rule"))
            .filter(|r| {
                field(r, "family") == family
                    && field(r, "table") == table
                    && field(r, "chain") == name
            })
            .count();
        let id = format!("nftables chain `{family} {table} {name}`");
        if field(chain, "policy") == "drop" {
            let outcome = match rules {
                0 => format!("with no rule in it, containers on {bridge} cannot reach each other"),
                n => format!(
                    "containers on {bridge} reach each other only if one of its {n} rules \
                     accepts their traffic"
                ),
            };
            found.push(format!(
                "{id} drops by default (policy drop) and {why}: {outcome}; stasis does not \
                 change host firewall policy (to allow it: `iptables -I FORWARD -i {bridge} -o \
                 {bridge} -j ACCEPT`)"
            ));
        } else if rules > 0 {
            found.push(format!(
                "{id} has {rules} rules and {why}: check that they let it pass"
            ));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shape of a Docker host's ruleset under iptables-nft, trimmed.
    const DOCKER: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
      {"table": {"family": "ip", "name": "filter", "handle": 1}},
      {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
      {"chain": {"family": "ip", "table": "filter", "name": "DOCKER", "handle": 3}},
      {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 7, "expr": [{"jump": {"target": "DOCKER"}}]}},
      {"table": {"family": "inet", "name": "stasis", "handle": 4}},
      {"chain": {"family": "inet", "table": "stasis", "name": "lock_in", "handle": 3, "type": "filter", "hook": "input", "prio": -300, "policy": "accept"}},
      {"table": {"family": "bridge", "name": "f", "handle": 5}},
      {"chain": {"family": "bridge", "table": "f", "name": "fw", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
      {"rule": {"family": "bridge", "table": "f", "chain": "fw", "handle": 2, "expr": [{"drop": null}]}}
    ]}"#;

    #[test]
    fn a_forward_policy_of_drop_is_named_when_bridged_traffic_meets_it() {
        let f = nft_findings(DOCKER, "stasis0", true);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].contains("`ip filter FORWARD`") && f[0].contains("policy drop"));
        assert!(f[0].contains("one of its 1 rules") && f[0].contains("-i stasis0 -o stasis0"));
        assert!(f[1].contains("`bridge f fw` has 1 rules"), "{}", f[1]);
        // Without br_netfilter only the bridge family's chains see bridged traffic.
        let f = nft_findings(DOCKER, "stasis0", false);
        assert_eq!(f.len(), 1);
        assert!(f[0].contains("bridge f fw"));
    }

    #[test]
    fn a_quiet_ruleset_gives_nothing() {
        let only_lock = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"chain": {"family": "inet", "table": "stasis", "name": "lock_out", "type": "filter", "hook": "output", "prio": -300, "policy": "accept"}}]}"#;
        assert!(nft_findings(only_lock, "stasis0", true).is_empty());
        assert!(nft_findings(r#"{"nftables": []}"#, "stasis0", true).is_empty());
        assert_eq!(nft_findings("not json", "stasis0", true).len(), 1);
    }
}
