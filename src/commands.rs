//! The commands that touch rclone: thin compositions of policy → compliance → render → rclone
//! → events → report. `init` and `check` live in [`crate::cli`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{json, Value};

use crate::cli::{load_checked, policy_path, Cli, Ctx, Done, SyncArgs};
use crate::compliance::{self, Finding, Severity};
use crate::exit::{fail, Code};
use crate::guards;
use crate::policy::{BucketsSpec, Policy, Side};
use crate::rclone::{display_argv, Rclone};
use crate::render::{self, PrivateConfig, Secrets};
use crate::report::{self, Document};
use crate::sync::{self, Job};
use crate::verify;

/// Load the policy and refuse to go on if compliance found an error (exit 3). Warnings are
/// printed to stderr and the command continues.
pub fn load_compliant(cli: &Cli, ctx: &Ctx) -> anyhow::Result<(Policy, Vec<Finding>)> {
    let (policy, findings) = load_checked(cli)?;
    refuse_noncompliant(&policy_path(cli), ctx, &findings)?;
    Ok((policy, findings))
}

/// Print the findings on stderr (warnings unless `-q`), and fail with exit 3 naming the rules
/// when any is an error.
pub fn refuse_noncompliant(path: &Path, ctx: &Ctx, findings: &[Finding]) -> anyhow::Result<()> {
    for f in findings {
        if !ctx.quiet || f.severity == Severity::Error {
            eprintln!(
                "offsite: {} {} {}: {}",
                match f.severity {
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                },
                f.id,
                f.field,
                f.message
            );
        }
    }
    if compliance::has_errors(findings) {
        let mut ids: Vec<&str> = findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        return Err(fail(
            Code::Noncompliant,
            format!(
                "{}: policy violates compliance rule(s) {}; `offsite check` explains each",
                path.display(),
                ids.join(", ")
            ),
        ));
    }
    Ok(())
}

/// `plan`: the config with secrets redacted, and the exact command lines.
pub fn plan(cli: &Cli, ctx: &Ctx) -> anyhow::Result<Done> {
    let (policy, findings) = load_checked(cli)?;
    let code = if compliance::has_errors(&findings) {
        Code::Noncompliant
    } else {
        Code::Ok
    };
    let config = render::render(&policy, &Secrets::Redacted)?;
    // plan contacts nothing: rclone is located but not run, so its version is not known here.
    let program =
        crate::rclone::locate(cli.rclone.as_deref()).unwrap_or_else(|_| PathBuf::from("rclone"));
    let conf = PathBuf::from("rclone.conf");
    let mut global: Vec<OsString> = vec!["--config".into(), conf.clone().into()];
    if let Some(ca) = std::env::var_os("AWS_CA_BUNDLE").filter(|v| !v.is_empty()) {
        global.push("--ca-cert".into());
        global.push(ca);
    }
    let mut commands = Vec::new();
    let buckets = match &policy.buckets {
        BucketsSpec::List(l) => l.clone(),
        BucketsSpec::All => {
            let mut a = global.clone();
            a.extend(["lsjson", "--dirs-only", "--max-depth", "1", "source:"].map(OsString::from));
            commands.push(display_argv(&program, &a));
            vec![crate::policy::BucketSpec {
                name: crate::policy::BucketName("<bucket>".into()),
                exclude: vec![],
            }]
        }
    };
    let g = &policy.guards;
    for b in &buckets {
        // Guard arguments as they will be computed at run time.
        let plan = crate::guards::BucketPlan {
            spec: b.clone(),
            skip: None,
            delete_limit: None,
            max_delete: None,
            backup_dir: (g.keep_deleted_days.0 > 0)
                .then(|| format!("offsite:deleted/<run-id>/{}", b.name)),
        };
        let mut argv = sync::sync_argv(&policy, global.clone(), &plan, false);
        if g.max_delete_percent.0 < 100 {
            let weight = guards::delete_weight(&policy, plan.backup_dir.is_some());
            let times = if weight > 1 {
                format!(" x {weight}")
            } else {
                String::new()
            };
            argv.push("--max-delete".into());
            argv.push(
                format!(
                    "<{}% of the replica's objects{times}>",
                    g.max_delete_percent.0
                )
                .into(),
            );
        }
        commands.push(display_argv(&program, &argv));
    }
    ctx.say(format!(
        "# rclone.conf (secrets redacted; `offsite render --to {}` writes the real one)",
        conf.display()
    ));
    ctx.say(config.trim_end());
    ctx.say("");
    ctx.say("# rclone commands, in order (run from the directory holding rclone.conf):");
    for c in &commands {
        ctx.say(c);
    }
    if !findings.is_empty() {
        ctx.say("");
        ctx.say("# compliance findings:");
        crate::cli::print_findings(ctx, &findings);
    }
    Ok(Done {
        doc: json!({
            "command": "plan",
            "policy": policy.name.0,
            "status": code.status(),
            "exit_code": code.as_i32(),
            "rclone_conf": config,
            "commands": commands,
            "findings": findings,
        }),
        code,
    })
}

/// `render --to FILE`: a working config for plain rclone.
pub fn render_to(cli: &Cli, ctx: &Ctx, to: &Path) -> anyhow::Result<Done> {
    let (policy, findings) = load_compliant(cli, ctx)?;
    let text = render::render(&policy, &Secrets::Real)?;
    render::write_0600(to, &text, true)?;
    ctx.say(format!(
        "wrote {} (mode 0600; remotes: source, destination, offsite). Try: rclone --config {} lsd offsite:",
        to.display(),
        to.display()
    ));
    ctx.say(
        "It holds the S3 keys and the (obscured, reversible) crypt passwords: keep it private.",
    );
    Ok(Done {
        doc: json!({
            "command": "render",
            "policy": policy.name.0,
            "status": "ok",
            "exit_code": 0,
            "file": to,
            "findings": findings,
        }),
        code: Code::Ok,
    })
}

struct Probe {
    check: &'static str,
    ok: bool,
    detail: String,
    advice: Option<String>,
}

/// `doctor`: read-only checks with advice.
pub fn doctor(cli: &Cli, ctx: &Ctx) -> anyhow::Result<Done> {
    let (policy, findings) = load_compliant(cli, ctx)?;
    let rclone = Rclone::probe(cli.rclone.as_deref())?;
    let sha = rclone
        .sha256()
        .unwrap_or_else(|e| format!("unreadable: {e}"));
    let mut probes = vec![Probe {
        check: "rclone",
        ok: true,
        detail: format!(
            "{} ({}) sha256:{sha}",
            rclone.path.display(),
            rclone.version_line
        ),
        advice: None,
    }];
    let config = PrivateConfig::new(&policy)?;
    let run = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        let mut a = rclone.meta_args(config.path());
        a.extend(args.iter().map(OsString::from));
        rclone.output(&a, None)
    };
    // Source: list its top level (the buckets).
    let out = run(&["lsjson", "--dirs-only", "--max-depth", "1", "source:"])?;
    let listed: Vec<String> = serde_json::from_slice::<Vec<Value>>(&out.stdout)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["Name"].as_str().map(String::from))
        .collect();
    probes.push(Probe {
        check: "source reachable",
        ok: out.status.success(),
        detail: if out.status.success() {
            format!("{} bucket(s) visible", listed.len())
        } else {
            sync::last_line(&out.stderr)
        },
        advice: (!out.status.success()).then(|| side_advice("source", &policy.source)),
    });
    if out.status.success() {
        for b in policy.listed_buckets() {
            let found = listed.contains(&b.name.0);
            probes.push(Probe {
                check: "source bucket",
                ok: found,
                detail: format!("{} {}", b.name, if found { "exists" } else { "NOT FOUND" }),
                advice: (!found).then(|| {
                    format!(
                        "create bucket {} on the source, or remove it from `buckets:`",
                        b.name
                    )
                }),
            });
        }
    }
    // Destination: the bucket that holds the crypt root must exist and be listable.
    let root = render::crypt_root(&policy);
    let bucket_path = match root.split_once('/') {
        Some((b, _)) => b.to_string(),
        None => root.clone(),
    };
    let out = run(&["lsf", "--max-depth", "1", &bucket_path])?;
    let missing = out.status.code() == Some(3);
    probes.push(Probe {
        check: "destination bucket",
        ok: out.status.success(),
        detail: if out.status.success() {
            format!("{bucket_path} reachable")
        } else if missing {
            format!("{bucket_path} does not exist")
        } else {
            sync::last_line(&out.stderr)
        },
        advice: (!out.status.success()).then(|| {
            if missing {
                "create the destination bucket (offsite sync creates it when the key may create buckets)".to_string()
            } else {
                side_advice("destination", &policy.destination)
            }
        }),
    });
    if out.status.success() {
        let (ok, detail) = guards::canary_status(&rclone, config.path(), &policy)?;
        probes.push(Probe {
            check: "key canary",
            ok,
            detail,
            advice: (!ok).then(|| {
                "restore the original encryption secrets; never sync with a new key into this root".to_string()
            }),
        });
    }
    drop(config);
    let ok = probes.iter().all(|p| p.ok);
    let canary_refused = probes.iter().any(|p| p.check == "key canary" && !p.ok);
    let code = if ok {
        Code::Ok
    } else if canary_refused {
        Code::GuardRefused
    } else {
        Code::Failed
    };
    for p in &probes {
        ctx.say(format!(
            "{} {}: {}",
            if p.ok { "ok  " } else { "FAIL" },
            p.check,
            p.detail
        ));
        if let Some(a) = &p.advice {
            ctx.say(format!("     -> {a}"));
        }
    }
    Ok(Done {
        doc: json!({
            "command": "doctor",
            "policy": policy.name.0,
            "status": code.status(),
            "exit_code": code.as_i32(),
            "rclone": {"path": rclone.path, "version": rclone.version.to_string(), "sha256": sha},
            "checks": probes.iter().map(|p| json!({"check": p.check, "ok": p.ok, "detail": p.detail, "advice": p.advice})).collect::<Vec<_>>(),
            "findings": findings,
        }),
        code,
    })
}

fn side_advice(name: &str, side: &Side) -> String {
    match side {
        Side::S3(s) => format!(
            "check {name}.endpoint ({}) is reachable from here, and that the keys in {} / {} are valid",
            s.endpoint, s.access_key_id.origin, s.secret_access_key.origin
        ),
        Side::Local { path } => format!("check that {} exists and is readable", path.display()),
        Side::Other { kind, .. } => format!("check the {kind} options of {name}"),
    }
}

/// `sync` (and the sync step of `run`): guards, then replicate each bucket.
pub fn sync(cli: &Cli, ctx: &Ctx, args: &SyncArgs) -> anyhow::Result<Done> {
    replicate(cli, ctx, args, "sync", false).map(|r| r.done)
}

/// `run`: the scheduled job: sync, verify (`verify.after_sync`), prune kept deletions older
/// than `keep_deleted_days`, then reporting (metrics, Pushgateway, attestation) — also when the
/// run failed or was interrupted, so monitoring sees every outcome.
pub fn run(cli: &Cli, ctx: &Ctx, args: &SyncArgs) -> anyhow::Result<Done> {
    let started = SystemTime::now();
    let result = replicate(cli, ctx, args, "run", true);
    // A dry run changes nothing anywhere: no metrics (it would move last_run and
    // last_success), no push, no attestation, locally or under the crypt root.
    if args.dry_run {
        return result.map(|r| r.done);
    }
    let path = policy_path(cli);
    // A policy that does not parse has no reporting settings to honour.
    let policy = match &result {
        Ok(r) => r.policy.clone(),
        Err(_) => match crate::policy::load(&path) {
            Ok(p) => p,
            Err(_) => return result.map(|r| r.done),
        },
    };
    let (doc, remote) = match &result {
        Ok(r) => (r.done.doc.clone(), Some((&r.rclone, &r.config))),
        Err(e) => {
            let code = crate::exit::code_of(e);
            (
                json!({
                    "command": "run",
                    "policy": policy.name.0,
                    "status": code.status(),
                    "exit_code": code.as_i32(),
                    "error": format!("{e:#}").replace('\n', " "),
                    "started": report::rfc3339(started),
                    "finished": report::rfc3339(SystemTime::now()),
                    "changed": false,
                    "buckets": [],
                    "guards": [],
                    "findings": [],
                }),
                None,
            )
        }
    };
    publish(&policy, &path, &doc, started, remote);
    result.map(|r| r.done)
}

/// Metrics, Pushgateway and attestation for a finished `run`. Failures to report are printed
/// on stderr and do not change the run's exit code (the run itself is what it was).
fn publish(
    policy: &Policy,
    policy_file: &std::path::Path,
    doc: &Value,
    started: SystemTime,
    remote: Option<(&Rclone, &PrivateConfig)>,
) {
    use crate::reporting;
    let secs = |t: SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    };
    let facts = reporting::RunFacts {
        policy: &policy.name.0,
        doc,
        started_unix: secs(started),
        finished_unix: secs(SystemTime::now()),
    };
    let r = &policy.reporting;
    if let Some(file) = &r.metrics_file {
        let path = std::path::Path::new(&file.0);
        let previous = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| reporting::previous_success(&t, &policy.name.0));
        let text = reporting::exposition(&facts, previous);
        if let Err(e) = reporting::write_atomic(path, text.as_bytes(), 0o644) {
            eprintln!("offsite run: warning: reporting.metrics_file: {e:#}");
        }
    }
    if let Some(url) = &r.pushgateway_url {
        // The Pushgateway keeps the previous success timestamp itself (POST replaces only the
        // names sent).
        let text = reporting::exposition(&facts, None);
        if let Err(e) = reporting::push(&url.0, &policy.name.0, &text) {
            eprintln!("offsite run: warning: reporting.pushgateway_url: {e:#}");
        }
    }
    let sha = remote.and_then(|(rc, _)| rc.sha256().ok());
    let record = reporting::attestation(policy, policy_file, doc, sha.as_deref());
    let Ok(bytes) = serde_json::to_vec_pretty(&record) else {
        return;
    };
    if let Some(file) = &r.attestation_file {
        if let Err(e) = reporting::write_atomic(std::path::Path::new(&file.0), &bytes, 0o644) {
            eprintln!("offsite run: warning: reporting.attestation_file: {e:#}");
        }
    }
    // Encrypted copy under the crypt root, only after a run that passed the key canary (a
    // refused or early-failed run writes nothing to the secondary).
    if let (Some((rclone, config)), Some(run_id)) = (remote, doc["run_id"].as_str()) {
        let mut a = rclone.meta_args(config.path());
        a.push("rcat".into());
        a.push(format!("offsite:.offsite/attestations/{run_id}.json").into());
        match rclone.output_cleanup(&a, Some(&bytes)) {
            Some(o) if o.status.success() => {}
            _ => eprintln!("offsite run: warning: could not store the attestation under .offsite/attestations/"),
        }
    }
}

/// What a replication leaves for `run`'s reporting: the document, and the rclone and private
/// config still alive for the encrypted attestation.
struct Replicated {
    done: Done,
    policy: Policy,
    rclone: Rclone,
    config: PrivateConfig,
}

fn replicate(
    cli: &Cli,
    ctx: &Ctx,
    args: &SyncArgs,
    command: &str,
    prune: bool,
) -> anyhow::Result<Replicated> {
    let started = SystemTime::now();
    let run_id = report::run_id(started);
    let (policy, findings) = load_compliant(cli, ctx)?;
    let rclone_path = crate::rclone::locate(cli.rclone.as_deref())?;
    let config = PrivateConfig::new(&policy)?;
    let shard = args.shard()?;
    // The version check (C013) runs while the guards' first read-only requests do (see
    // guards::Guarded::begin); only `buckets: all` needs it before, to list the source.
    let mut probed: Option<Rclone> = None;
    let mut buckets = sync::resolve_buckets(&policy, &args.buckets, || {
        let r = probed.insert(Rclone::probe_at(rclone_path.clone())?);
        sync::discover_source_buckets(r, config.path())
    })?;
    if let Some((i, n)) = shard {
        buckets.retain(|b| sync::shard_of(&b.name.0, n) == i);
    }
    let opts = guards::Options {
        dry_run: args.dry_run,
        allow_empty_source: args.allow_empty_source,
        // A lock, a lease and a state file per shard: shards run at once by design.
        lock_suffix: shard
            .map(|(i, n)| format!("-shard-{i}-of-{n}"))
            .unwrap_or_default(),
    };
    let early = Rclone::unchecked(rclone_path.clone());
    let (guarded, plans, rclone) = guards::Guarded::begin(
        &policy,
        &early,
        &config,
        &run_id,
        &buckets,
        &opts,
        || match probed {
            Some(r) => Ok(r),
            None => Rclone::probe_at(rclone_path.clone()),
        },
    )?;
    let job = Job {
        policy: &policy,
        rclone: &rclone,
        config: config.path(),
        dry_run: args.dry_run,
        verbose: ctx.verbose,
        quiet: ctx.quiet,
    };
    let progress = crate::progress::Progress::new(ctx.no_progress || ctx.quiet);
    let outcomes = sync::sync_all(&job, &plans, &progress);
    crate::signals::check()?;
    let mut decisions = guarded.decisions.clone();
    for (r, c) in &outcomes {
        if let Some(c) = c {
            if c.max_delete_reached {
                decisions.push(guards::Decision {
                    guard: "max_delete",
                    bucket: Some(r.name.clone()),
                    result: "refused",
                    detail: r.error.clone().unwrap_or_default(),
                });
            }
        }
    }
    // Writing the state also releases the lease. When that fails (the secondary went away
    // mid-run) the run fails (exit 5), but the document keeps every bucket's result; verify
    // and prune need the secondary too and are skipped.
    let mut run_errors: Vec<String> = Vec::new();
    let mut extra_codes: Vec<Code> = Vec::new();
    if let Err(e) = guarded.finish(&outcomes) {
        crate::signals::check()?;
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("offsite {command}: error: {msg}");
        extra_codes.push(crate::exit::code_of(&e));
        run_errors.push(msg);
    }
    let secondary_ok = run_errors.is_empty();
    // run: verify what this run synced (verify.after_sync), before pruning.
    let mut verified: std::collections::BTreeMap<String, Value> = Default::default();
    let mut verify_codes = Vec::new();
    let after = policy.verify.after_sync;
    if prune && secondary_ok && !args.dry_run && after != crate::policy::VerifyMode::None {
        let mode = match after {
            crate::policy::VerifyMode::Sample => verify::Mode::Sample,
            crate::policy::VerifyMode::Full => verify::Mode::Full,
            _ => verify::Mode::Changed,
        };
        let synced: Vec<crate::policy::BucketSpec> = plans
            .iter()
            .zip(&outcomes)
            .filter(|(_, (r, c))| c.is_some() && r.code() == Code::Ok)
            .map(|(p, _)| p.spec.clone())
            .collect();
        let changed_of = |b: &str| -> Option<Vec<String>> {
            outcomes
                .iter()
                .find(|(r, _)| r.name == b)
                .and_then(|(_, c)| c.as_ref())
                .map(|c| c.changed_objects.clone())
        };
        let seed = verify::random_seed();
        let settings = verify::Settings {
            mode,
            seed,
            show: 10,
        };
        for (name, r) in verify_buckets(&policy, &rclone, &config, &synced, &settings, &changed_of)
        {
            match r {
                Ok(v) => {
                    verify_codes.push(if v.ok() { Code::Ok } else { Code::VerifyFailed });
                    if !ctx.json && !ctx.quiet {
                        print_verify(ctx, &name, &v);
                    }
                    verified.insert(name, serde_json::to_value(&v).unwrap_or(Value::Null));
                }
                Err(e) => {
                    verify_codes.push(crate::exit::code_of(&e));
                    eprintln!("offsite {command}: verify {name}: {e:#}");
                    verified.insert(name, json!({"error": format!("{e:#}")}));
                }
            }
        }
        crate::signals::check()?;
    }
    let mut pruned = Vec::new();
    if prune && secondary_ok && policy.guards.keep_deleted_days.0 > 0 {
        match guards::prune(
            &rclone,
            config.path(),
            policy.guards.keep_deleted_days.0,
            args.dry_run,
        ) {
            Ok((ids, d)) => {
                pruned = ids;
                decisions.extend(d);
            }
            Err(e) => {
                crate::signals::check()?;
                let msg = format!("pruning deleted/: {e:#}").replace('\n', " ");
                eprintln!("offsite {command}: error: {msg}");
                extra_codes.push(crate::exit::code_of(&e));
                run_errors.push(msg);
            }
        }
    }
    let results: Vec<_> = outcomes.into_iter().map(|(r, _)| r).collect();
    let code = report::overall(
        results
            .iter()
            .map(|r| r.code())
            .chain(verify_codes)
            .chain(extra_codes),
    );
    let changed = !args.dry_run
        && (results.iter().any(|r| r.copied > 0 || r.deleted > 0) || !pruned.is_empty());
    if !ctx.json && !ctx.quiet {
        print!("{}", report::table(&results));
        for line in report::decision_lines(&decisions) {
            println!("{line}");
        }
        println!(
            "{}: {} bucket(s), changed: {changed}{}",
            code.status(),
            results.len(),
            if args.dry_run {
                " (dry run: nothing was changed)"
            } else {
                ""
            }
        );
    }
    for r in results.iter().filter(|r| r.code() != Code::Ok) {
        eprintln!(
            "offsite {command}: bucket {}: {}",
            r.name,
            r.error.as_deref().unwrap_or(r.status)
        );
    }
    let doc = Document {
        command,
        policy: &policy.name.0,
        run_id: &run_id,
        rclone: &rclone,
        started,
        finished: SystemTime::now(),
        code,
        changed,
        buckets: results
            .iter()
            .map(|r| {
                let mut b = serde_json::to_value(r).unwrap_or(Value::Null);
                if let Some(v) = verified.get(&r.name) {
                    b["verify"] = v.clone();
                    if v["error"].is_string()
                        || v["unverifiable"].as_u64().unwrap_or(0) > 0
                        || v["differ"].as_u64().unwrap_or(0) > 0
                        || v["missing_on_destination"].as_u64().unwrap_or(0) > 0
                        || v["missing_on_source"].as_u64().unwrap_or(0) > 0
                    {
                        b["status"] = json!(Code::VerifyFailed.status());
                    }
                }
                b
            })
            .collect(),
        guards: guards::decisions_json(&decisions),
        findings: &findings,
    };
    let mut doc = doc.to_json();
    if !run_errors.is_empty() {
        doc["error"] = json!(run_errors.join("; "));
    }
    if prune {
        doc["pruned_generations"] = json!(pruned);
    }
    if let Some((i, n)) = shard {
        doc["shard"] = json!({"index": i, "count": n});
    }
    Ok(Replicated {
        done: Done { doc, code },
        policy,
        rclone,
        config,
    })
}

/// `deleted list`: the generations kept under deleted/, with counts and age.
pub fn deleted_list(cli: &Cli, ctx: &Ctx) -> anyhow::Result<Done> {
    let (policy, findings) = load_compliant(cli, ctx)?;
    let rclone = Rclone::probe(cli.rclone.as_deref())?;
    let config = PrivateConfig::new(&policy)?;
    let gens = guards::generations(&rclone, config.path())?;
    drop(config);
    if !ctx.json {
        if gens.is_empty() {
            ctx.say("no kept deletions under deleted/");
        } else {
            ctx.say(format!(
                "{:<24} {:>8} {:>10} {:>8}  buckets",
                "run id", "objects", "bytes", "age (d)"
            ));
        }
        for g in &gens {
            let buckets: Vec<String> = g.buckets.iter().map(|(b, n)| format!("{b}:{n}")).collect();
            ctx.say(format!(
                "{:<24} {:>8} {:>10} {:>8}  {}",
                g.run_id,
                g.objects,
                report::human_bytes(g.bytes),
                g.age_days
                    .map(|a| format!("{a:.1}"))
                    .unwrap_or_else(|| "?".into()),
                buckets.join(" ")
            ));
        }
    }
    Ok(Done {
        doc: json!({
            "command": "deleted list",
            "policy": policy.name.0,
            "status": "ok",
            "exit_code": 0,
            "keep_deleted_days": policy.guards.keep_deleted_days.0,
            "generations": guards::generations_json(&gens),
            "findings": findings,
        }),
        code: Code::Ok,
    })
}

/// Verify `buckets` with `mode`, `parallel_buckets` at a time. `changed` gives, per bucket, the
/// objects the last sync copied (None: unknown, the whole bucket is checked and reported as
/// `full`).
pub fn verify_buckets(
    policy: &Policy,
    rclone: &Rclone,
    config: &PrivateConfig,
    buckets: &[crate::policy::BucketSpec],
    settings: &verify::Settings,
    changed: &(dyn Fn(&str) -> Option<Vec<String>> + Sync),
) -> Vec<(String, anyhow::Result<verify::Verified>)> {
    let verify::Settings { mode, seed, show } = *settings;
    // A full check reads every object, so it keeps to `parallel_buckets` like the sync. A
    // changed-only or sampled check reads few objects per bucket and its time is mostly rclone
    // start-up and listing: up to 4 buckets at once.
    let parallel = policy.sync.parallel_buckets.0 as usize;
    let parallel = if mode == verify::Mode::Full {
        parallel
    } else {
        parallel.max(4)
    };
    let workers = parallel.clamp(1, buckets.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: std::sync::Mutex<Vec<Option<anyhow::Result<verify::Verified>>>> =
        std::sync::Mutex::new((0..buckets.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(b) = buckets.get(i) else { break };
                let list = if mode == verify::Mode::Changed {
                    changed(&b.name.0)
                } else {
                    None
                };
                let effective = if mode == verify::Mode::Changed && list.is_none() {
                    verify::Mode::Full
                } else {
                    mode
                };
                let req = verify::Request {
                    policy,
                    rclone,
                    config,
                    bucket: b,
                    mode: effective,
                    changed: list.as_deref(),
                    sample_percent: policy.verify.sample_percent.0,
                    seed,
                    checkers: policy.sync.checkers.0,
                    show,
                };
                let r = verify::verify_bucket(&req);
                if let Ok(mut o) = out.lock() {
                    o[i] = Some(r);
                }
            });
        }
    });
    out.into_inner()
        .unwrap_or_default()
        .into_iter()
        .zip(buckets)
        .map(|(r, b)| {
            (
                b.name.0.clone(),
                r.unwrap_or_else(|| Err(anyhow::anyhow!("internal error: bucket not verified"))),
            )
        })
        .collect()
}

/// The changed objects per bucket recorded by the last syncs: `.offsite/state.json`, merged
/// with the per-shard `state-shard-I-of-N.json` files (the newest entry of a bucket wins),
/// and the key canary (`None` when absent), in one `rclone copy`.
fn read_state(
    rclone: &Rclone,
    config: &PrivateConfig,
) -> anyhow::Result<(Option<guards::State>, Option<Vec<u8>>)> {
    let down = config.scratch_dir("state-in")?;
    let mut a = rclone.meta_args(config.path());
    a.extend(["copy", "offsite:.offsite"].map(OsString::from));
    a.push(down.clone().into());
    a.extend(
        [
            "--max-depth",
            "1",
            "--include",
            "/state*.json",
            "--include",
            "/canary",
        ]
        .map(OsString::from),
    );
    let out = rclone.output(&a, None)?;
    if !out.status.success() && out.status.code() != Some(3) {
        return Err(fail(
            Code::Failed,
            format!(
                "reading .offsite/state*.json failed: {}",
                sync::last_line(&out.stderr)
            ),
        ));
    }
    let canary = std::fs::read(down.join("canary")).ok();
    let mut merged: Option<guards::State> = None;
    for e in std::fs::read_dir(&down)?.flatten() {
        if e.file_name() == "canary" {
            continue;
        }
        let st: guards::State =
            serde_json::from_slice(&std::fs::read(e.path())?).map_err(|err| {
                fail(
                    Code::Failed,
                    format!(
                        ".offsite/{} is not valid: {err}",
                        e.file_name().to_string_lossy()
                    ),
                )
            })?;
        let m = merged.get_or_insert_with(guards::State::default);
        for (b, bs) in st.buckets {
            let newer = m
                .buckets
                .get(&b)
                .is_none_or(|old| old.last_sync < bs.last_sync);
            if newer {
                m.buckets.insert(b, bs);
            }
        }
    }
    Ok((merged, canary))
}

fn print_verify(ctx: &Ctx, name: &str, v: &verify::Verified) {
    ctx.say(format!(
        "verify {name} ({}): checked {}, matched {} ({} by download), differ {}, missing on destination {}, missing on source {}, unverifiable {}{}",
        v.mode,
        v.checked,
        v.matched,
        v.by_download,
        v.differ,
        v.missing_on_destination,
        v.missing_on_source,
        v.unverifiable,
        v.seed.map(|s| format!(", seed {s}")).unwrap_or_default()
    ));
    for p in &v.problems {
        ctx.say(format!("  {}: {}", p.problem, p.object));
    }
}

/// `verify`: check the replica against the source.
pub fn verify_cmd(cli: &Cli, ctx: &Ctx, args: &crate::cli::VerifyArgs) -> anyhow::Result<Done> {
    let started = SystemTime::now();
    let run_id = report::run_id(started);
    let (policy, findings) = load_compliant(cli, ctx)?;
    let rclone_path = crate::rclone::locate(cli.rclone.as_deref())?;
    let config = PrivateConfig::new(&policy)?;
    let mode = args.mode.unwrap_or(match policy.verify.after_sync {
        crate::policy::VerifyMode::Changed => verify::Mode::Changed,
        crate::policy::VerifyMode::Sample => verify::Mode::Sample,
        _ => verify::Mode::Full,
    });
    // The version check (C013) and the canary (with the state, for changed mode, in the same
    // copy of .offsite/) run at once: they only read, and for a changed-only check these
    // rclone starts are most of its cost. With a wrong key the state reads as absent and the
    // canary refuses anyway; a version that is too old refuses before either result is used.
    let early = Rclone::unchecked(rclone_path.clone());
    let (probed, canary) = std::thread::scope(|s| {
        let probed = s.spawn(|| Rclone::probe_at(rclone_path.clone()));
        let canary = if mode == verify::Mode::Changed {
            read_state(&early, &config).and_then(|(state, found)| {
                Ok((
                    guards::canary_verdict(&early, config.path(), &policy, found)?,
                    state,
                ))
            })
        } else {
            guards::canary_status(&early, config.path(), &policy).map(|c| (c, None))
        };
        let panicked = || anyhow::anyhow!("internal error: a reader thread panicked");
        (probed.join().unwrap_or_else(|_| Err(panicked())), canary)
    });
    let rclone = probed?;
    let ((canary_ok, canary_detail), state) = canary?;
    if !canary_ok {
        return Err(fail(
            Code::GuardRefused,
            format!("key canary: {canary_detail}; nothing was verified"),
        ));
    }
    let buckets = sync::resolve_buckets(&policy, &args.buckets, || {
        sync::discover_source_buckets(&rclone, config.path())
    })?;
    let changed = |b: &str| -> Option<Vec<String>> {
        let bs = state.as_ref()?.buckets.get(b)?;
        (!bs.changed_truncated).then(|| bs.changed_objects.clone())
    };
    let seed = args.seed.unwrap_or_else(verify::random_seed);
    let settings = verify::Settings {
        mode,
        seed,
        show: args.show,
    };
    let results = verify_buckets(&policy, &rclone, &config, &buckets, &settings, &changed);
    drop(config);
    crate::signals::check()?;
    let mut codes = Vec::new();
    let mut out = Vec::new();
    for (name, r) in &results {
        match r {
            Ok(v) => {
                let code = if v.ok() { Code::Ok } else { Code::VerifyFailed };
                codes.push(code);
                if !ctx.json {
                    print_verify(ctx, name, v);
                }
                out.push(json!({"name": name, "status": code.status(), "verify": v}));
            }
            Err(e) => {
                let code = crate::exit::code_of(e);
                codes.push(code);
                eprintln!("offsite verify: bucket {name}: {e:#}");
                out.push(json!({"name": name, "status": code.status(), "error": format!("{e:#}")}));
            }
        }
    }
    let code = report::overall(codes);
    ctx.say(format!(
        "{}: {} bucket(s) verified",
        code.status(),
        results.len()
    ));
    let doc = Document {
        command: "verify",
        policy: &policy.name.0,
        run_id: &run_id,
        rclone: &rclone,
        started,
        finished: SystemTime::now(),
        code,
        changed: false,
        buckets: out,
        guards: vec![json!({"guard": "key_canary", "result": "pass", "detail": canary_detail})],
        findings: &findings,
    };
    Ok(Done {
        doc: doc.to_json(),
        code,
    })
}
