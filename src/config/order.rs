//! Start order from `depends_on`: which service starts before which, and the
//! reverse at shutdown. Plain data in, plain data out, so every rule is a
//! unit test.
//!
//! - [`start_order`]: every service after everything it depends on; among
//!   services free to go, the one written first in the file goes first (the
//!   order of a file without `depends_on` is kept as it is).
//! - [`stop_waves`]: groups of services that may stop side by side, each
//!   group only once every service depending on one of its members has
//!   stopped.
//! - A name that is not a service, or a cycle (a service depending on
//!   itself is a cycle of one), is an [`OrderError`] naming every service
//!   involved.

use std::collections::{BTreeMap, BTreeSet};

/// Why the services cannot be put in order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// `service` depends on `missing`, which is not a service.
    #[error("service {service:?} depends on {missing:?}, which is not a configured service")]
    Unknown {
        /// The service whose `depends_on` names it.
        service: String,
        /// The name that is not a service.
        missing: String,
    },
    /// The services in `cycle` depend on each other in a ring (in order:
    /// each depends on the next, the last on the first).
    #[error("{}", describe_cycle(cycle))]
    Cycle {
        /// Every service of the cycle.
        cycle: Vec<String>,
    },
}

fn describe_cycle(cycle: &[String]) -> String {
    match cycle {
        [one] => format!("service {one:?} depends on itself"),
        _ => {
            let mut ring: Vec<String> = cycle.iter().map(|s| format!("{s:?}")).collect();
            ring.push(format!("{:?}", cycle[0]));
            format!(
                "services {} depend on each other in a cycle: {}",
                cycle
                    .iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                ring.join(" -> ")
            )
        }
    }
}

/// The services (name, what it depends on), in the file's order, as
/// indices into `services` in the order they start.
pub fn start_order(services: &[(&str, &[String])]) -> Result<Vec<usize>, OrderError> {
    let index: BTreeMap<&str, usize> = services
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (*name, i))
        .collect();
    let mut deps: Vec<BTreeSet<usize>> = Vec::with_capacity(services.len());
    for (name, depends_on) in services {
        let mut set = BTreeSet::new();
        for dep in *depends_on {
            match index.get(dep.as_str()) {
                Some(&i) => {
                    set.insert(i);
                }
                None => {
                    return Err(OrderError::Unknown {
                        service: (*name).to_owned(),
                        missing: dep.clone(),
                    });
                }
            }
        }
        deps.push(set);
    }
    let mut started = vec![false; services.len()];
    let mut order = Vec::with_capacity(services.len());
    while order.len() < services.len() {
        // The first in file order whose dependencies have all started.
        let next =
            (0..services.len()).find(|&i| !started[i] && deps[i].iter().all(|&d| started[d]));
        match next {
            Some(i) => {
                started[i] = true;
                order.push(i);
            }
            None => {
                let cycle = find_cycle(&deps, &started);
                return Err(OrderError::Cycle {
                    cycle: cycle
                        .into_iter()
                        .map(|i| services[i].0.to_owned())
                        .collect(),
                });
            }
        }
    }
    Ok(order)
}

/// A cycle among the services not started: every one left depends on
/// another one left, so walking from any of them must come back.
fn find_cycle(deps: &[BTreeSet<usize>], started: &[bool]) -> Vec<usize> {
    let Some(mut at) = (0..deps.len()).find(|&i| !started[i]) else {
        return Vec::new();
    };
    let mut seen: Vec<usize> = Vec::new();
    loop {
        if let Some(pos) = seen.iter().position(|&s| s == at) {
            return seen.split_off(pos);
        }
        seen.push(at);
        match deps[at].iter().find(|&&d| !started[d]) {
            Some(&d) => at = d,
            // Cannot happen (it would have started); end the walk.
            None => return seen,
        }
    }
}

/// The order of shutdown: waves of service names. Every service depending
/// on a member of a wave is in an earlier wave; services in one wave do not
/// depend on each other. Names in `depends_on` that are not among
/// `services` are ignored (the service is not running). If a cycle is left
/// (a checked configuration has none), everything still running stops
/// together in a last wave rather than never.
pub fn stop_waves(services: &[(&str, &[String])]) -> Vec<Vec<String>> {
    let names: BTreeSet<&str> = services.iter().map(|(n, _)| *n).collect();
    let mut stopped: BTreeSet<&str> = BTreeSet::new();
    let mut waves = Vec::new();
    while stopped.len() < names.len() {
        // Free to stop: nothing still running depends on it.
        let wave: Vec<&str> = services
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| !stopped.contains(n))
            .filter(|n| {
                !services.iter().any(|(other, deps)| {
                    other != n && !stopped.contains(other) && deps.iter().any(|d| d == n)
                })
            })
            .collect();
        let wave = if wave.is_empty() {
            services
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| !stopped.contains(n))
                .collect()
        } else {
            wave
        };
        stopped.extend(wave.iter().copied());
        waves.push(wave.into_iter().map(str::to_owned).collect());
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deps(list: &[(&'static str, &[&'static str])]) -> Vec<(&'static str, Vec<String>)> {
        list.iter()
            .map(|(n, d)| (*n, d.iter().map(|s| (*s).to_owned()).collect()))
            .collect()
    }

    fn order(list: &[(&'static str, &[&'static str])]) -> Result<Vec<&'static str>, OrderError> {
        let owned = deps(list);
        let view: Vec<(&str, &[String])> = owned.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        start_order(&view).map(|o| o.into_iter().map(|i| list[i].0).collect())
    }

    fn waves(list: &[(&'static str, &[&'static str])]) -> Vec<Vec<String>> {
        let owned = deps(list);
        let view: Vec<(&str, &[String])> = owned.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        stop_waves(&view)
    }

    #[test]
    fn no_dependencies_keep_the_file_order() {
        assert_eq!(
            order(&[("a", &[]), ("b", &[]), ("c", &[])]),
            Ok(vec!["a", "b", "c"])
        );
        assert_eq!(order(&[]), Ok(vec![]));
    }

    #[test]
    fn dependencies_start_first_and_the_rest_keeps_its_order() {
        let list = [
            ("api", &["db", "cache"][..]),
            ("web", &["api"]),
            ("db", &[]),
            ("cache", &["db"]),
            ("lone", &[]),
        ];
        assert_eq!(order(&list), Ok(vec!["db", "cache", "api", "web", "lone"]));
    }

    #[test]
    fn an_unknown_name_is_named_with_its_service() {
        let e = order(&[("a", &["nope"])]).expect_err("unknown");
        assert_eq!(
            e,
            OrderError::Unknown {
                service: "a".into(),
                missing: "nope".into()
            }
        );
        assert!(e.to_string().contains("\"nope\""), "{e}");
    }

    #[test]
    fn a_cycle_names_every_service_in_it_and_no_other() {
        let e = order(&[
            ("ok", &[]),
            ("a", &["b"]),
            ("b", &["c"]),
            ("c", &["a"]),
            ("d", &["a"]),
        ])
        .expect_err("cycle");
        let OrderError::Cycle { cycle } = &e else {
            panic!("{e:?}")
        };
        let mut sorted = cycle.clone();
        sorted.sort();
        assert_eq!(sorted, ["a", "b", "c"]);
        let text = e.to_string();
        assert!(
            text.contains("\"a\"") && text.contains("\"b\"") && text.contains("\"c\""),
            "{text}"
        );
        assert!(
            !text.contains("\"d\"") && !text.contains("\"ok\""),
            "{text}"
        );
    }

    #[test]
    fn depending_on_itself_is_a_cycle_of_one() {
        let e = order(&[("a", &["a"])]).expect_err("self");
        assert_eq!(
            e,
            OrderError::Cycle {
                cycle: vec!["a".into()]
            }
        );
        assert_eq!(e.to_string(), "service \"a\" depends on itself");
    }

    #[test]
    fn shutdown_goes_in_reverse_waves() {
        let list = [
            ("db", &[][..]),
            ("cache", &["db"]),
            ("api", &["db", "cache"]),
            ("web", &["api"]),
            ("lone", &[]),
        ];
        assert_eq!(
            waves(&list),
            vec![
                vec!["web".to_owned(), "lone".into()],
                vec!["api".into()],
                vec!["cache".into()],
                vec!["db".into()]
            ]
        );
        // Without dependencies everything stops together.
        assert_eq!(
            waves(&[("a", &[]), ("b", &[])]),
            vec![vec!["a".to_owned(), "b".into()]]
        );
        // A dependency that is not running is ignored.
        assert_eq!(waves(&[("a", &["gone"])]), vec![vec!["a".to_owned()]]);
    }

    #[test]
    fn a_cycle_at_shutdown_still_stops_everything() {
        let w = waves(&[("x", &[][..]), ("a", &["b", "x"]), ("b", &["a"])]);
        assert_eq!(w, vec![vec!["x".to_owned(), "a".into(), "b".into()]]);
    }
}
