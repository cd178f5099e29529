use std::collections::BTreeMap;

use kiln_storage::catalog::alerts::{
    AlertInstance, AlertRuleDef, AlertRuleKind, AlertState, AlertsState, series_key,
};
use kiln_storage::ids::{AlertEventId, AlertRuleId};

use super::eval::{Observation, evaluate};
use super::template;
use AlertState::*;

const S: i64 = 1_000_000_000;

fn threshold(for_s: i64, recovery: Option<&str>) -> AlertRuleDef {
    AlertRuleDef {
        id: AlertRuleId(1),
        name: "hot".into(),
        database: "plant".into(),
        kind: AlertRuleKind::Threshold {
            sql: String::new(),
            value_column: "value".into(),
            condition: "> 90".into(),
            recovery: recovery.map(Into::into),
        },
        every_nanos: S,
        for_nanos: for_s * S,
        severity: "critical".into(),
        summary: "{{ $labels.host }} at {{ $value }} ({{ labels.site }})".into(),
        description: String::new(),
        labels: BTreeMap::from([("site".to_owned(), "north".to_owned())]),
        receiver: None,
        created_at: 0,
    }
}

fn obs(host: &str, value: f64) -> Observation {
    Observation {
        series: BTreeMap::from([("host".to_owned(), host.to_owned())]),
        value: Some(value),
    }
}

/// Runs evaluations at 0 s, 1 s, … through a real [`AlertsState`], returning each one's
/// transitions as (host, from, to).
fn run(
    rule: &AlertRuleDef,
    steps: &[Vec<Observation>],
) -> Vec<Vec<(String, AlertState, AlertState)>> {
    let mut state = AlertsState::default();
    state.create_rule(rule).unwrap();
    let mut next = 0;
    steps
        .iter()
        .enumerate()
        .map(|(i, observed)| {
            let ts = evaluate(rule, state.instances.get(&rule.id), observed, i as i64 * S).unwrap();
            ts.into_iter()
                .map(|mut t| {
                    t.id = AlertEventId(next);
                    next += 1;
                    state.transition(&t).unwrap();
                    (
                        t.series.get("host").cloned().unwrap_or_default(),
                        t.from,
                        t.to,
                    )
                })
                .collect()
        })
        .collect()
}

fn t(host: &str, from: AlertState, to: AlertState) -> (String, AlertState, AlertState) {
    (host.to_owned(), from, to)
}

#[test]
fn a_threshold_rule_is_pending_for_its_duration_then_fires_and_resolves() {
    let rule = threshold(2, None);
    let steps = vec![
        vec![obs("a", 95.0), obs("b", 10.0)],
        vec![obs("a", 96.0), obs("b", 95.0)],
        vec![obs("a", 97.0), obs("b", 10.0)],
        vec![obs("a", 50.0)],
    ];
    assert_eq!(
        run(&rule, &steps),
        vec![
            vec![t("a", Inactive, Pending)],
            vec![t("b", Inactive, Pending)],
            vec![t("a", Pending, Firing), t("b", Pending, Inactive)],
            vec![t("a", Firing, Resolved)],
        ]
    );
}

#[test]
fn recovery_holds_a_firing_alert_until_the_value_is_back_below_it() {
    let rule = threshold(0, Some("< 85"));
    let steps = vec![
        vec![obs("a", 95.0)],
        vec![obs("a", 88.0)],
        vec![obs("a", 84.0)],
        vec![obs("a", 91.0)],
        // No longer returned: resolved, recovery or not.
        vec![],
    ];
    assert_eq!(
        run(&rule, &steps),
        vec![
            vec![t("a", Inactive, Firing)],
            vec![],
            vec![t("a", Firing, Resolved)],
            vec![t("a", Inactive, Firing)],
            vec![t("a", Firing, Resolved)],
        ]
    );
}

#[test]
fn a_silent_series_stays_firing_after_it_leaves_the_no_data_window() {
    let mut rule = threshold(0, None);
    rule.kind = AlertRuleKind::NoData {
        table: "machine".into(),
        after_nanos: 60 * S,
        lookback_nanos: 3600 * S,
    };
    let steps = vec![
        vec![obs("a", 5.0), obs("b", 120.0)],
        vec![obs("a", 6.0)],
        vec![obs("a", 7.0), obs("b", 1.0)],
    ];
    assert_eq!(
        run(&rule, &steps),
        vec![
            vec![t("b", Inactive, Firing)],
            vec![],
            vec![t("b", Firing, Resolved)],
        ]
    );
}

#[test]
fn templates_render_labels_and_value_and_bad_ones_are_refused() {
    let rule = threshold(0, None);
    let ts = evaluate(&rule, None, &[obs("m1", 97.5)], 0).unwrap();
    assert_eq!(ts[0].summary, "m1 at 97.5 (north)");
    assert_eq!(ts[0].value, Some(97.5));
    assert!(template::check("{{ $labels.host }} {{$value}}").is_ok());
    for bad in ["{{ host }}", "{{ $labels. }}", "open {{ $value"] {
        assert!(template::check(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn a_nan_value_is_stored_as_null() {
    let mut rule = threshold(0, None);
    rule.kind = AlertRuleKind::Threshold {
        sql: String::new(),
        value_column: "value".into(),
        condition: "!= 0".into(),
        recovery: None,
    };
    let ts = evaluate(&rule, None, &[obs("a", f64::NAN)], 0).unwrap();
    assert_eq!(ts.len(), 1);
    assert_eq!(ts[0].value, None);
    let current: BTreeMap<String, AlertInstance> = BTreeMap::new();
    assert!(evaluate(&rule, Some(&current), &[], 0).unwrap().is_empty());
    assert_eq!(series_key(&ts[0].series), "host=a");
}
