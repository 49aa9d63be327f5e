//! The report: `SUITE.json` (a list of records), `SUITE.md` (a Markdown table plus
//! notes) and charts (`SUITE.svg`, `SUITE.png`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::stats::Summary;

/// One figure: the median of `runs` runs, with the extremes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Where the traffic or request went: `direct`, `clusterip`, `nodeport`, `api`, `kernel`, ...
    pub path: String,
    /// Proxy mode (`nftables`, `iptables`) or `-` when no proxy is involved.
    pub mode: String,
    pub metric: String,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
    /// median / the reference path's median for the same metric (`direct` in the
    /// datapath suite, `underlay` in the overlay suite; None elsewhere).
    pub ratio_to_direct: Option<f64>,
    /// What produced the number (iperf3, ferry-bench's own load generator, ...).
    pub tool: String,
}

impl Record {
    pub fn new(path: &str, mode: &str, metric: &str, unit: &str, s: Summary, tool: &str) -> Self {
        Record {
            path: path.into(),
            mode: mode.into(),
            metric: metric.into(),
            unit: unit.into(),
            median: s.median,
            min: s.min,
            max: s.max,
            runs: s.runs,
            ratio_to_direct: None,
            tool: tool.into(),
        }
    }

    /// "path" or "path (mode)".
    pub fn label(&self) -> String {
        if self.mode.is_empty() || self.mode == "-" {
            self.path.clone()
        } else {
            format!("{} ({})", self.path, self.mode)
        }
    }
}

/// Fills `ratio_to_direct` for every record whose metric has a record of the
/// `reference` path: the one of the same mode (measured alongside that mode) if
/// there is one, else the mode-less (`-`) one.
pub fn fill_ratios(records: &mut [Record], reference: &str) {
    let refs: Vec<(String, String, f64)> = records
        .iter()
        .filter(|r| r.path == reference)
        .map(|r| (r.mode.clone(), r.metric.clone(), r.median))
        .collect();
    for r in records.iter_mut() {
        let base = refs
            .iter()
            .find(|(mode, metric, _)| *mode == r.mode && *metric == r.metric)
            .or_else(|| {
                refs.iter()
                    .find(|(mode, metric, _)| mode == "-" && *metric == r.metric)
            });
        if let Some((_, _, d)) = base {
            if *d != 0.0 {
                r.ratio_to_direct = Some(r.median / d);
            }
        }
    }
}

/// A suite's results.
#[derive(Debug, Default)]
pub struct Report {
    pub suite: String,
    pub title: String,
    pub records: Vec<Record>,
    /// Free text shown under the table (targets, comparisons, how it was measured).
    pub notes: Vec<String>,
    /// The path ratios are taken against (the limit the others are measured by).
    pub reference: String,
}

/// Formats a figure with a precision that suits its size.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let a = x.abs();
    if a >= 1000.0 {
        let s = format!("{x:.0}");
        // thousands separators
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

impl Report {
    pub fn new(suite: &str, title: &str) -> Self {
        Report {
            suite: suite.into(),
            title: title.into(),
            reference: "direct".into(),
            ..Default::default()
        }
    }

    /// Fills every record's ratio to the reference path.
    pub fn fill_ratios(&mut self) {
        fill_ratios(&mut self.records, &self.reference);
    }

    pub fn push(&mut self, r: Record) {
        self.records.push(r);
    }

    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// The first record with this path, mode and metric.
    pub fn find(&self, path: &str, mode: &str, metric: &str) -> Option<&Record> {
        self.records
            .iter()
            .find(|r| r.path == path && r.mode == mode && r.metric == metric)
    }

    /// The Markdown table of all records.
    pub fn markdown_table(&self) -> String {
        let with_ratio = self.records.iter().any(|r| r.ratio_to_direct.is_some());
        let mut s = String::new();
        s.push_str("| path | mode | metric | median | min | max | unit | runs |");
        if with_ratio {
            let _ = write!(s, " × {} |", self.reference);
        }
        s.push_str(" tool |\n|---|---|---|--:|--:|--:|---|--:|");
        if with_ratio {
            s.push_str("--:|");
        }
        s.push_str("---|\n");
        for r in &self.records {
            let _ = write!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.path,
                r.mode,
                r.metric,
                fmt_num(r.median),
                fmt_num(r.min),
                fmt_num(r.max),
                r.unit,
                r.runs
            );
            if with_ratio {
                let ratio = r.ratio_to_direct.map_or("".into(), |x| format!("{x:.2}"));
                let _ = write!(s, " {ratio} |");
            }
            let _ = writeln!(s, " {} |", r.tool);
        }
        s
    }

    /// The whole Markdown document.
    pub fn markdown(&self, environment: &str) -> String {
        let mut s = format!("# {}\n\n{}\n\n", self.title, environment);
        s.push_str(&self.markdown_table());
        if !self.notes.is_empty() {
            s.push('\n');
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        let _ = writeln!(
            s,
            "\nChart: [{0}.svg]({0}.svg) ([PNG]({0}.png)). Each figure is the median of `runs` runs; min and max show the noise.",
            self.suite
        );
        s
    }

    /// Writes SUITE.json, SUITE.md, SUITE.svg and SUITE.png into `dir`; returns the paths.
    pub fn write(&self, dir: &Path, environment: &str) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join(format!("{}.json", self.suite));
        std::fs::write(&json, serde_json::to_string_pretty(&self.records)? + "\n")?;
        let md = dir.join(format!("{}.md", self.suite));
        std::fs::write(&md, self.markdown(environment))?;
        let mut written = vec![json, md];
        match crate::chart::draw(self, dir) {
            Ok(paths) => written.extend(paths),
            Err(e) => eprintln!("warning: charts for {} not drawn: {e:#}", self.suite),
        }
        Ok(written)
    }
}

/// One line describing the machine the figures come from.
pub fn environment() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!("Machine: Linux {kernel}, {cores} cores ({cpu}), {mem_gib:.0} GiB RAM. Client, server, proxy and control plane all share these cores.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(path: &str, mode: &str, metric: &str, median: f64) -> Record {
        Record::new(
            path,
            mode,
            metric,
            "Gbit/s",
            Summary {
                median,
                min: median - 1.0,
                max: median + 1.0,
                runs: 3,
            },
            "iperf3",
        )
    }

    #[test]
    fn ratios_and_table() {
        let mut recs = vec![
            rec("direct", "-", "tcp throughput", 40.0),
            rec("clusterip", "nftables", "tcp throughput", 38.0),
            rec("clusterip", "nftables", "other", 1.0),
        ];
        fill_ratios(&mut recs, "direct");
        assert_eq!(recs[0].ratio_to_direct, Some(1.0));
        assert_eq!(recs[1].ratio_to_direct, Some(0.95));
        assert_eq!(recs[2].ratio_to_direct, None);
        let mut rep = Report::new("datapath", "Datapath");
        rep.records = recs;
        rep.note("a note");
        let md = rep.markdown("env");
        assert!(md.starts_with("# Datapath\n\nenv\n\n| path | mode | metric |"));
        assert!(md.contains("| clusterip | nftables | tcp throughput | 38.0 | 37.0 | 39.0 | Gbit/s | 3 | 0.95 | iperf3 |"));
        assert!(md.contains(
            "| clusterip | nftables | other | 1.00 | 0.000 | 2.00 | Gbit/s | 3 |  | iperf3 |"
        ));
        assert!(md.contains("- a note"));
        let json = serde_json::to_value(&rep.records).unwrap();
        assert_eq!(json[1]["ratio_to_direct"], 0.95);
        assert_eq!(json[2]["ratio_to_direct"], serde_json::Value::Null);
        for key in [
            "path", "mode", "metric", "unit", "median", "min", "max", "runs", "tool",
        ] {
            assert!(json[0].get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn ratios_against_another_reference_path() {
        let mut rep = Report::new("overlay", "Overlay");
        rep.reference = "underlay".into();
        rep.records = vec![
            rec("underlay", "vxlan", "tcp throughput", 20.0),
            rec("pod-to-pod", "vxlan", "tcp throughput", 18.0),
            rec("underlay", "host-gw", "tcp throughput", 10.0),
            rec("pod-to-pod", "host-gw", "tcp throughput", 9.5),
        ];
        rep.fill_ratios();
        let ratios: Vec<_> = rep.records.iter().map(|r| r.ratio_to_direct).collect();
        assert_eq!(ratios, [Some(1.0), Some(0.9), Some(1.0), Some(0.95)]);
        assert!(rep.markdown_table().starts_with(
            "| path | mode | metric | median | min | max | unit | runs | × underlay | tool |"
        ));
    }

    #[test]
    fn number_formatting() {
        assert_eq!(fmt_num(12345.6), "12,346");
        assert_eq!(fmt_num(-1234567.0), "-1,234,567");
        assert_eq!(fmt_num(123.4), "123");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(0.01234), "0.012");
        assert_eq!(fmt_num(f64::NAN), "n/a");
    }
}
