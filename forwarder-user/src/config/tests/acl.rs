//! The `acl` field as written: each keyword of `default` and `action`, and
//! where a network both allowed and denied is reported.

use super::{errors, load};

/// The route's ACL in the order it is tried, under an optional global one.
fn compact(global: &str, route_acl: &str) -> String {
    let text = format!(
        "{global}routes:\n  a: {{scheme: tcp, host: 10.0.0.1, port: 1001:80, acl: {route_acl}}}\n"
    );
    match load(&text) {
        Ok((c, _)) => c.listeners[0].acl.as_ref().expect("an ACL").compact(),
        Err(e) => panic!("{e}\n--- file:\n{text}"),
    }
}

#[test]
fn default_takes_allow_and_deny_in_any_case() {
    // Left out, a list of denials lets the rest in; each keyword overrides.
    assert_eq!(
        compact("", "{deny: [10.0.0.5]}"),
        "deny 10.0.0.5/32, else allow (drop)"
    );
    assert_eq!(
        compact("", "{deny: [10.0.0.5], default: Deny}"),
        "deny 10.0.0.5/32, else deny (drop)"
    );
    // Left out, a list of allowances keeps the rest out.
    assert_eq!(
        compact("", "{allow: [10.0.0.0/8], default: ' allow '}"),
        "allow 10.0.0.0/8, else allow (drop)"
    );
}

#[test]
fn action_takes_drop_and_reject_and_the_routes_wins_over_the_global_one() {
    assert_eq!(
        compact(
            "acl: {action: reject}\n",
            "{deny: [10.0.0.5], action: DROP}"
        ),
        "deny 10.0.0.5/32, else allow (drop)"
    );
    assert_eq!(
        compact(
            "acl: {action: drop}\n",
            "{deny: [10.0.0.5], action: reject}"
        ),
        "deny 10.0.0.5/32, else allow (reject)"
    );
    assert_eq!(
        compact("acl: {action: reject}\n", "{deny: [10.0.0.5]}"),
        "deny 10.0.0.5/32, else allow (reject)"
    );
}

#[test]
fn other_words_for_default_and_action_are_errors_naming_what_is_allowed() {
    let e = errors(
        "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 1001:80, acl: {deny: [10.0.0.5], default: block}}\n",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("test.yaml:2:")
            && e[0].contains("`block`")
            && e[0].contains("`allow` or `deny`"),
        "{e:?}"
    );
    let e = errors(
        "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 1001:80, acl: {deny: [10.0.0.5], action: ignore}}\n",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("`ignore`") && e[0].contains("`drop` (the default) or `reject`"),
        "{e:?}"
    );
}

#[test]
fn a_network_denied_before_it_is_allowed_is_reported_where_it_is_allowed() {
    // The deny list comes first, so the allow entry is the one to blame;
    // the other allow entry (line 9) is innocent.
    let e = errors(
        "routes:
  a:
    scheme: tcp
    host: 10.0.0.1
    port: 1001:80
    acl:
      deny: [10.0.0.0/8]
      allow:
        - 192.168.0.0/16
        - 10.0.0.0/8
",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("test.yaml:10:") && e[0].contains("`10.0.0.0/8` both allowed and denied"),
        "{e:?}"
    );
}
