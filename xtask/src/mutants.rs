//! `cargo xtask mutants`: mutation testing with cargo-mutants (not in CI).
//! Each target's mutants must be caught by its unit tests; equivalent
//! mutants are listed with their reason in `.cargo/mutants.toml`.
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{build, cmd, workspace_root};

/// What one run mutates, and the unit tests that must catch it.
struct Target {
    /// What `--target` names it by.
    id: &'static str,
    name: &'static str,
    /// The files mutated (cargo-mutants globs).
    files: &'static [&'static str],
    /// Further arguments that pick the mutants.
    select: &'static [&'static str],
    /// Test name filters: only the unit tests of that code (`--lib`), so
    /// a mutant is caught by them and not by a namespace test of the
    /// daemon, and each mutant builds only the library's test binary.
    tests: &'static [&'static str],
    /// Test name filters skipped: fuzzers, which only look for panics and
    /// would take most of each mutant's test time.
    skip: &'static [&'static str],
}

const TARGETS: &[Target] = &[
    Target {
        id: "common",
        name: "forwarder-common",
        files: &["forwarder-common/src/**"],
        select: &[],
        tests: &[],
        skip: &[],
    },
    Target {
        id: "sweeper",
        name: "sweeper expiry policy",
        // By file, whatever its functions are called; the map I/O and the
        // task loop around the policy are the namespace tests' to drive.
        files: &["forwarder-user/src/kernel/sweeper.rs"],
        select: &["--exclude-re", r"Sweeper::|monotonic_ns"],
        tests: &["kernel::sweeper"],
        skip: &[],
    },
];

/// Reported, not yet held to zero missed (`--all`, or `--target`).
const MORE_TARGETS: &[Target] = &[
    Target {
        id: "config",
        name: "config",
        files: &["forwarder-user/src/config/**"],
        select: &[],
        tests: &["config::"],
        skip: &["config::tests::fuzz::"],
    },
    Target {
        id: "relay",
        name: "relay pure parts",
        files: &[
            "forwarder-user/src/relay/backend.rs",
            "forwarder-user/src/relay/idle.rs",
            "forwarder-user/src/relay/sessions.rs",
        ],
        select: &[],
        // Not `relay::`: its socket tests take a minute per mutant.
        tests: &["relay::backend::", "relay::idle::", "relay::sessions::"],
        skip: &[],
    },
];

#[derive(clap::Args)]
pub struct Args {
    /// Also report config/ and the relay's pure parts (slow: config/ has
    /// about a thousand mutants).
    #[arg(long)]
    all: bool,
    /// Only this target (repeatable): common, sweeper, relay, config.
    #[arg(long = "target", value_name = "ID")]
    targets: Vec<String>,
    /// Only the mutants of these files (repeatable), each one of the
    /// chosen targets' files, e.g. forwarder-user/src/config/values.rs.
    #[arg(long, value_name = "PATH")]
    file: Vec<String>,
    /// Only shard K of N (0-based, K/N) of each target's mutants, dealt
    /// round-robin (`.cargo/mutants.toml`), so a shard samples every file.
    #[arg(long, value_name = "K/N")]
    shard: Option<String>,
    /// Skip the mutants that the last run of the same selection caught
    /// (or found unviable): after new tests, rerun only what was missed.
    #[arg(long)]
    iterate: bool,
    /// Only the mutants the last run of the same selection missed, found
    /// by file and description wherever their lines have moved since.
    #[arg(long, conflicts_with_all = ["iterate", "shard"])]
    missed: bool,
    /// Mutants built and tested at once.
    #[arg(short, long, default_value_t = 1)]
    jobs: u32,
}

/// One target as this run narrows it.
struct Run<'a> {
    target: &'a Target,
    files: Vec<String>,
    /// Under target/mutants/: one per selection, so `--iterate` finds its
    /// own last run.
    dir: String,
}

fn plan<'a>(args: &Args) -> Result<Vec<Run<'a>>> {
    let all_targets = TARGETS.iter().chain(MORE_TARGETS);
    let chosen: Vec<&Target> = if args.targets.is_empty() {
        let more = if args.all { MORE_TARGETS } else { &[] };
        TARGETS.iter().chain(more).collect()
    } else {
        let mut chosen = Vec::new();
        for id in &args.targets {
            let Some(t) = all_targets.clone().find(|t| t.id == id) else {
                let ids: Vec<&str> = all_targets.clone().map(|t| t.id).collect();
                bail!("--target {id}: no such target; one of {}", ids.join(", "));
            };
            chosen.push(t);
        }
        chosen
    };
    let shard = match &args.shard {
        Some(s) => Some(parse_shard(s)?),
        None => None,
    };
    if shard.is_some() && args.iterate {
        // cargo-mutants shards what is left after skipping: another set.
        bail!("--shard and --iterate together pick a different set each run; use one");
    }
    for f in &args.file {
        if !chosen.iter().any(|t| owns(t, f)) {
            let ids: Vec<&str> = chosen.iter().map(|t| t.id).collect();
            bail!(
                "--file {f}: not a file of the chosen targets ({}); pick one with --target",
                ids.join(", ")
            );
        }
    }
    let mut runs = Vec::new();
    for target in chosen {
        let files: Vec<String> = if args.file.is_empty() {
            target.files.iter().map(|f| f.to_string()).collect()
        } else {
            args.file
                .iter()
                .filter(|f| owns(target, f))
                .cloned()
                .collect()
        };
        if files.is_empty() {
            continue;
        }
        let mut dir = target.id.to_owned();
        if !args.file.is_empty() {
            for f in &files {
                let stem = Path::new(f).file_stem().and_then(|s| s.to_str());
                dir.push('-');
                dir.push_str(stem.unwrap_or("file"));
            }
        }
        if let Some((k, n)) = shard {
            dir.push_str(&format!("-shard-{k}-of-{n}"));
        }
        runs.push(Run { target, files, dir });
    }
    Ok(runs)
}

/// Whether `file` is one of the target's files: named, or under a `dir/**`.
fn owns(target: &Target, file: &str) -> bool {
    target
        .files
        .iter()
        .any(|glob| match glob.strip_suffix("**") {
            Some(dir) => file.starts_with(dir) && file.ends_with(".rs"),
            None => *glob == file,
        })
}

fn parse_shard(s: &str) -> Result<(u32, u32)> {
    let parsed = s
        .split_once('/')
        .and_then(|(k, n)| Some((k.parse::<u32>().ok()?, n.parse::<u32>().ok()?)));
    match parsed {
        Some((k, n)) if k < n => Ok((k, n)),
        _ => bail!("--shard {s}: want K/N with 0 <= K < N, e.g. 0/8"),
    }
}

pub fn run(args: &Args) -> Result<()> {
    let runs = plan(args)?;
    install()?;
    let object = build::ebpf_object()?;
    let root = workspace_root();
    let mut reports = Vec::new();
    for run in &runs {
        let target = run.target;
        eprintln!("\n==> cargo mutants: {} ({})", target.name, run.dir);
        let out = root.join("target/mutants").join(&run.dir);
        let missed = if args.missed {
            let last = out.join("mutants.out/missed.txt");
            let text = std::fs::read_to_string(&last)
                .with_context(|| format!("--missed: no last run to read ({})", last.display()))?;
            let names: Vec<String> = text.lines().filter_map(missed_name_re).collect();
            if names.is_empty() {
                eprintln!("{}: the last run missed nothing", run.dir);
                continue;
            }
            names
        } else {
            Vec::new()
        };
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root)
            .env("FORWARDER_EBPF_OBJ", &object)
            // Each build dir builds in its own copy of the target dir. In
            // a shared one, parallel jobs write the same test binary (its
            // name does not depend on the copy's path), so a job could run
            // another's mutant and report a false miss.
            .env_remove("CARGO_TARGET_DIR")
            .args(["mutants", "--no-shuffle", "--jobs", &args.jobs.to_string()])
            .arg("--copy-target=true")
            .arg("--output")
            .arg(&out)
            // Every cargo call, the build included: only the library.
            .arg("--cargo-arg=--lib");
        // The unit tests take seconds; a minute is a hang, not a slow run.
        cmd.args(["--minimum-test-timeout", "60"]);
        // No debug info for the crates rebuilt per mutant: a third less to
        // compile and link (the dependencies keep theirs, and stay built).
        for package in ["forwarder-common", "forwarder-user"] {
            cmd.arg(format!(
                "--cargo-arg=--config=profile.test.package.{package}.debug=0"
            ));
        }
        for f in &run.files {
            cmd.args(["--file", f]);
        }
        cmd.args(target.select);
        if let Some(shard) = &args.shard {
            cmd.args(["--shard", shard]);
        }
        if args.iterate {
            cmd.arg("--iterate");
        }
        for name in &missed {
            cmd.args(["--re", name]);
        }
        if !target.tests.is_empty() {
            // The second `--` passes them to libtest, which takes several.
            cmd.args(["--", "--"]).args(target.tests);
            for skip in target.skip {
                cmd.args(["--skip", skip]);
            }
        }
        eprintln!("{}", cmd::describe(&cmd));
        let status = cmd.status().context("cannot start cargo mutants")?;
        // 0: all caught; 2: some missed; 3: some timed out. Anything else
        // (4: the tests fail without a mutant) is no score.
        if !matches!(status.code(), Some(0 | 2 | 3)) {
            bail!("cargo mutants for {} failed ({status})", target.name);
        }
        let outcomes = out.join("mutants.out");
        let skipped = if args.iterate {
            lines(&outcomes.join("previously_caught.txt"))
        } else {
            0
        };
        let held = TARGETS.iter().any(|t| t.id == target.id);
        reports.push((run, held, skipped, score(&outcomes.join("outcomes.json"))?));
    }
    println!("\nmutants by file (caught + timed out of viable):");
    let mut missed = 0;
    for (run, held, skipped, by_file) in &reports {
        println!("{} ({}):", run.target.name, run.dir);
        let mut sum = Tally::default();
        for (file, t) in by_file {
            println!("  {file}: {}", t.line());
            sum.add(t);
        }
        println!("  total: {}", sum.line());
        if *skipped > 0 {
            println!("  and {skipped} skipped, caught or unviable in the last run (--iterate)");
        }
        // Only the held targets fail the command; the others are reported.
        if *held {
            missed += sum.missed;
        }
    }
    if missed > 0 {
        bail!(
            "{missed} missed mutants where none may be: see target/mutants/*/mutants.out/missed.txt"
        );
    }
    Ok(())
}

/// A regex for one line of `missed.txt` (`file:line:col: description`)
/// that matches the same mutant at any line and column.
fn missed_name_re(line: &str) -> Option<String> {
    let (file, rest) = line.split_once(':')?;
    let (_line, rest) = rest.split_once(':')?;
    let (_col, description) = rest.split_once(": ")?;
    Some(format!(
        r"^{}:\d+:\d+: {}$",
        regex_escape(file),
        regex_escape(description)
    ))
}

fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// The version the figures in the README were made with.
const MUTANTS_VERSION: &str = "27.1.0";

fn install() -> Result<()> {
    if cmd::output(Command::new("cargo").args(["mutants", "--version"])).is_some() {
        return Ok(());
    }
    eprintln!("installing cargo-mutants {MUTANTS_VERSION}");
    cmd::run(Command::new("cargo").args([
        "install",
        "cargo-mutants",
        "--locked",
        "--version",
        MUTANTS_VERSION,
    ]))
}

#[derive(Default, Debug, PartialEq)]
struct Tally {
    caught: u64,
    timeout: u64,
    missed: u64,
    unviable: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.caught += other.caught;
        self.timeout += other.timeout;
        self.missed += other.missed;
        self.unviable += other.unviable;
    }

    fn line(&self) -> String {
        let viable = self.caught + self.timeout + self.missed;
        let pct = if viable == 0 {
            100.0
        } else {
            100.0 * (self.caught + self.timeout) as f64 / viable as f64
        };
        format!(
            "{pct:.0}% ({} caught, {} timed out, {} missed, {} unviable)",
            self.caught, self.timeout, self.missed, self.unviable
        )
    }
}

/// Outcomes by mutated file, from cargo-mutants' `outcomes.json`.
fn score(path: &Path) -> Result<BTreeMap<String, Tally>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    tally(&text).with_context(|| format!("in {}", path.display()))
}

fn tally(outcomes_json: &str) -> Result<BTreeMap<String, Tally>> {
    let doc: serde_json::Value = serde_json::from_str(outcomes_json)?;
    let mut by_file = BTreeMap::<String, Tally>::new();
    let outcomes = doc["outcomes"].as_array().context("no outcomes")?;
    for o in outcomes {
        let Some(mutant) = o["scenario"].get("Mutant") else {
            continue; // the baseline
        };
        let file = mutant["file"].as_str().context("a mutant without a file")?;
        let t = by_file.entry(file.to_owned()).or_default();
        match o["summary"].as_str() {
            Some("CaughtMutant") => t.caught += 1,
            Some("Timeout") => t.timeout += 1,
            Some("MissedMutant") => t.missed += 1,
            Some("Unviable") => t.unviable += 1,
            other => bail!("unknown outcome {other:?} of {}", mutant["name"]),
        }
    }
    Ok(by_file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(targets: &[&str], file: &[&str], shard: Option<&str>) -> Args {
        Args {
            all: false,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            file: file.iter().map(|f| f.to_string()).collect(),
            shard: shard.map(str::to_owned),
            iterate: false,
            missed: false,
            jobs: 1,
        }
    }

    #[test]
    fn a_missed_mutant_is_found_again_wherever_its_line_moved() {
        let re = missed_name_re(
            "forwarder-user/src/config/yaml.rs:342:23: replace > with >= in Builder<'_>::count",
        )
        .unwrap();
        assert_eq!(
            re,
            r"^forwarder\-user/src/config/yaml\.rs:\d+:\d+: replace > with >= in Builder<'_>::count$"
        );
        assert_eq!(missed_name_re("no colons here"), None);
    }

    fn dirs(args: &Args) -> Result<Vec<String>> {
        Ok(plan(args)?.into_iter().map(|r| r.dir).collect())
    }

    #[test]
    fn a_run_is_named_by_target_files_and_shard() {
        assert_eq!(dirs(&args(&[], &[], None)).unwrap(), ["common", "sweeper"]);
        let all = Args {
            all: true,
            ..args(&[], &[], None)
        };
        assert_eq!(
            dirs(&all).unwrap(),
            ["common", "sweeper", "config", "relay"]
        );
        let values = "forwarder-user/src/config/values.rs";
        let validate = "forwarder-user/src/config/validate.rs";
        let config = args(&["config"], &[validate, values], Some("1/4"));
        let runs = plan(&config).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].files, [validate, values]);
        assert_eq!(runs[0].dir, "config-validate-values-shard-1-of-4");
        assert_eq!(
            plan(&args(&["relay"], &[], None)).unwrap()[0].files.len(),
            3
        );
    }

    #[test]
    fn bad_selections_are_refused() {
        let values = "forwarder-user/src/config/values.rs";
        for (a, want) in [
            (args(&["nope"], &[], None), "--target nope: no such target"),
            (
                args(&["sweeper"], &[values], None),
                "--file forwarder-user/src/config/values.rs: not a file",
            ),
            (args(&["config"], &[], Some("4/4")), "--shard 4/4: want K/N"),
            (args(&["config"], &[], Some("x")), "--shard x: want K/N"),
            (
                Args {
                    iterate: true,
                    ..args(&["config"], &[], Some("0/4"))
                },
                "--shard and --iterate",
            ),
        ] {
            let e = plan(&a).err().expect(want).to_string();
            assert!(e.starts_with(want), "{e}");
        }
        let relay = TARGETS
            .iter()
            .chain(MORE_TARGETS)
            .find(|t| t.id == "relay")
            .unwrap();
        assert!(owns(relay, "forwarder-user/src/relay/idle.rs"));
        assert!(!owns(relay, "forwarder-user/src/relay/tcp.rs"));
    }

    #[test]
    fn tallies_outcomes_by_file() {
        let json = r#"{"outcomes": [
            {"scenario": "Baseline", "summary": "Success"},
            {"scenario": {"Mutant": {"file": "a.rs", "name": "a1"}}, "summary": "CaughtMutant"},
            {"scenario": {"Mutant": {"file": "a.rs", "name": "a2"}}, "summary": "MissedMutant"},
            {"scenario": {"Mutant": {"file": "a.rs", "name": "a3"}}, "summary": "Timeout"},
            {"scenario": {"Mutant": {"file": "b.rs", "name": "b1"}}, "summary": "Unviable"}
        ]}"#;
        let t = tally(json).unwrap();
        let a = Tally {
            caught: 1,
            timeout: 1,
            missed: 1,
            unviable: 0,
        };
        assert_eq!(t["a.rs"], a);
        assert_eq!(
            a.line(),
            "67% (1 caught, 1 timed out, 1 missed, 0 unviable)"
        );
        assert_eq!(t["b.rs"].unviable, 1);
        assert!(tally(r#"{"outcomes": [{"scenario": {"Mutant": {"file": "c.rs", "name": "c"}}, "summary": "Odd"}]}"#).is_err());
    }
}
