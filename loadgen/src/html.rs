//! The HTML report: one self-contained file, inline CSS and SVG, nothing fetched to view it.

use crate::lesson::{Finding, Lesson, Side};
use crate::report::{markdown_cells, Report};

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the report.
pub fn html(report: &Report) -> String {
    let s = &report.settings;
    page(
        &format!("loadgen {}: {}", report.command, s.scenario.as_str()),
        &report_body(report),
    )
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>{}</title>\
         <style>{CSS}</style></head><body>{body}</body></html>\n",
        esc(title)
    )
}

/// A lesson's page: what it shows, the two numbers side by side, why, and the runs' charts.
pub fn lesson_html(lesson: &Lesson, finding: &Finding, text: &str) -> String {
    let mut body = format!(
        "<h1>lesson {}: {}</h1><p class=meta>{}</p><p><b>Shows:</b> {}</p><h2>{}</h2>",
        esc(lesson.name),
        esc(lesson.problem),
        if finding.passed {
            "shown: the break appears and the fix holds".to_owned()
        } else {
            format!(
                "NOT SHOWN: {}",
                esc(finding.failure.as_deref().unwrap_or(""))
            )
        },
        esc(lesson.shows),
        esc(&finding.metric)
    );
    body.push_str(&two_bars(&finding.breaking, &finding.fixing));
    body.push_str(&format!(
        "<p><b>Why.</b> {}</p><h2>As printed</h2><pre>{}</pre>",
        esc(lesson.why),
        esc(text)
    ));
    if let Some(report) = &finding.report {
        body.push_str(&report_body(report));
    }
    page(&format!("lesson {}", lesson.name), &body)
}

/// The breaking and the fixing number as two horizontal bars.
fn two_bars(breaking: &Side, fixing: &Side) -> String {
    let max = [breaking.value, fixing.value]
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let (w, row_h, left) = (720.0, 30.0, 260.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" role=img \
         aria-label=\"the breaking and the fixing number\">",
        row_h * 2.0 + 10.0
    );
    for (k, (side, color)) in [(breaking, "#d62728"), (fixing, "#2ca02c")]
        .iter()
        .enumerate()
    {
        let yy = 5.0 + k as f64 * row_h;
        let bw = if max > 0.0 && side.value.is_finite() {
            (w - left - 200.0) * side.value / max
        } else {
            0.0
        };
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=end>{}</text>\
             <rect x=\"{left}\" y=\"{yy:.1}\" width=\"{bw:.1}\" height=\"{}\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            left - 6.0,
            yy + 18.0,
            esc(&side.label),
            row_h - 6.0,
            left + bw + 6.0,
            yy + 18.0,
            esc(&side.text)
        ));
    }
    svg.push_str("</svg>");
    svg
}

/// The report's sections (heading, charts, table, invariants), without the page around them.
fn report_body(report: &Report) -> String {
    let s = &report.settings;
    let mut body = String::new();
    body.push_str(&format!(
        "<h1>loadgen {}: {}</h1><p class=meta>API {} · seed <code>{}</code> · {} model · bound {} · \
         started {} · {}</p>",
        esc(report.command),
        esc(s.scenario.as_str()),
        s.api.as_str(),
        report.seed,
        s.model.as_str(),
        esc(&s.bound()),
        esc(&report.started_at),
        esc(&report.tool)
    ));
    let legend: String = report
        .runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "<span class=key><i style=\"background:{}\"></i>{}{}</span>",
                COLORS[i % COLORS.len()],
                esc(&r.label()),
                if r.status == "skipped" {
                    " (skipped)"
                } else {
                    ""
                }
            )
        })
        .collect();
    body.push_str(&format!("<p>{legend}</p>"));

    let ops = ops(report);
    for op in &ops {
        body.push_str(&format!(
            "<h2>Latency: {}</h2>{}",
            esc(op),
            latency_chart(report, op)
        ));
    }
    body.push_str("<h2>Throughput</h2>");
    body.push_str(&throughput_chart(report));
    body.push_str(&timeline_charts(report));
    body.push_str("<h2>Audit</h2>");
    body.push_str(&audit_chart(report));
    body.push_str("<h2>Side by side</h2>");
    body.push_str(&table(report));
    for r in &report.runs {
        if let Some(c) = &r.chaos {
            body.push_str(&format!(
                "<h3>Chaos: {}</h3><p>faults drawn from: {} · gap {} · outage {}</p><ul>",
                esc(&r.label()),
                esc(&c.faults_drawn_from.join(", ")),
                esc(&c.gap),
                esc(&c.outage)
            ));
            for s in &c.services {
                body.push_str(&format!("<li>service: {}</li>", esc(s)));
            }
            for (l, rec) in c.lines().iter().zip(&c.injected) {
                body.push_str(&format!(
                    "<li class={}>{}</li>",
                    if rec.error.is_some() || rec.back_after_ms.is_none() {
                        "fail"
                    } else {
                        "pass"
                    },
                    esc(l)
                ));
            }
            for n in &c.notes {
                body.push_str(&format!("<li>note: {}</li>", esc(n)));
            }
            body.push_str("</ul>");
        }
        if let Some(a) = &r.audit {
            body.push_str(&format!("<h3>Invariants: {}</h3><ul>", esc(&r.label())));
            body.push_str(&format!(
                "<li class={}><b>quiet</b>: {} after {} ms (under way at the last look: {})</li>",
                if a.quiet.quiet { "pass" } else { "not-quiet" },
                if a.quiet.quiet { "yes" } else { "no" },
                a.quiet.waited_ms,
                esc(&a.quiet.busy())
            ));
            for inv in &a.invariants {
                body.push_str(&format!(
                    "<li class={}><b>{} {}</b>: {}{} — {}</li>",
                    inv.status,
                    inv.id,
                    esc(inv.name),
                    inv.status,
                    inv.violations.map_or(String::new(), |n| format!(" ({n})")),
                    esc(&inv.detail)
                ));
            }
            for n in &a.notes {
                body.push_str(&format!("<li>note: {}</li>", esc(n)));
            }
            body.push_str("</ul>");
        }
    }
    body
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:70em;color:#222}\
h2{margin-top:1.6em;border-bottom:1px solid #ddd}.meta{color:#666}\
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}\
th{background:#f4f4f4}.key{margin-right:1.2em}.key i{display:inline-block;width:.9em;height:.9em;\
margin-right:.3em;vertical-align:middle}li.fail{color:#b00}li.pass{color:#070}li.not-quiet{color:#a60}\
svg text{font:12px system-ui,sans-serif}";

fn ops(report: &Report) -> Vec<String> {
    let mut ops: Vec<String> = report
        .runs
        .iter()
        .filter_map(|r| r.results.as_ref())
        .flat_map(|x| x.latency.keys().cloned())
        .collect();
    ops.sort();
    ops.dedup();
    ops
}

/// Grouped bars per percentile, one bar per stage, on a log scale (p50 and max both visible).
fn latency_chart(report: &Report, op: &str) -> String {
    let labels = ["p50", "p90", "p99", "p99.9", "max"];
    let series: Vec<(usize, String, [f64; 5])> = report
        .runs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let l = r.results.as_ref()?.latency.get(op)?;
            Some((
                i,
                r.label(),
                [l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms],
            ))
        })
        .collect();
    if series.is_empty() {
        return "<p>no data</p>".into();
    }
    let max = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .fold(0.001f64, f64::max);
    let lo = 0.01f64; // 10 µs
    let top = 10f64.powf(max.log10().ceil());
    let (w, h, left, bottom, top_pad) = (720.0, 280.0, 60.0, 30.0, 10.0);
    let plot_h = h - bottom - top_pad;
    let y = |v: f64| {
        let f = (v.max(lo).log10() - lo.log10()) / (top.log10() - lo.log10());
        top_pad + plot_h * (1.0 - f)
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=img \
         aria-label=\"latency percentiles of {op}\">"
    );
    let mut decade = lo;
    while decade <= top * 1.0001 {
        let yy = y(decade);
        svg.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{w}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#eee\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=end>{} ms</text>",
            left - 4.0,
            yy + 4.0,
            trim_num(decade)
        ));
        decade *= 10.0;
    }
    let group_w = (w - left) / labels.len() as f64;
    let bar_w = (group_w * 0.8) / series.len() as f64;
    for (g, label) in labels.iter().enumerate() {
        let gx = left + g as f64 * group_w + group_w * 0.1;
        for (k, (i, stage, values)) in series.iter().enumerate() {
            let v = values[g];
            let x = gx + k as f64 * bar_w;
            let yy = y(v);
            svg.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\">\
                 <title>{} {label}: {v} ms</title></rect>",
                bar_w - 2.0,
                (h - bottom - yy).max(0.0),
                COLORS[i % COLORS.len()],
                esc(stage)
            ));
            svg.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=middle font-size=10>{}</text>",
                x + bar_w / 2.0 - 1.0,
                yy - 3.0,
                trim_num(v)
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=middle>{label}</text>",
            gx + group_w * 0.4,
            h - 10.0
        ));
    }
    svg.push_str("</svg>");
    svg
}

fn trim_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Horizontal bars: achieved requests per second per stage.
fn throughput_chart(report: &Report) -> String {
    let rows: Vec<(usize, String, Option<f64>)> = report
        .runs
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r.label(), r.results.as_ref().map(|x| x.achieved_rps)))
        .collect();
    let max = rows.iter().filter_map(|r| r.2).fold(1.0f64, f64::max);
    let (w, row_h, left) = (720.0, 28.0, 140.0);
    let h = row_h * rows.len() as f64 + 10.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=img \
         aria-label=\"throughput per stage\">"
    );
    for (k, (i, stage, rps)) in rows.iter().enumerate() {
        let yy = 5.0 + k as f64 * row_h;
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=end>{}</text>",
            left - 6.0,
            yy + 17.0,
            esc(stage)
        ));
        match rps {
            Some(v) => {
                let bw = (w - left - 120.0) * v / max;
                svg.push_str(&format!(
                    "<rect x=\"{left}\" y=\"{yy:.1}\" width=\"{bw:.1}\" height=\"{}\" fill=\"{}\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\">{v:.1} req/s</text>",
                    row_h - 6.0,
                    COLORS[i % COLORS.len()],
                    left + bw + 6.0,
                    yy + 17.0
                ));
            }
            None => svg.push_str(&format!(
                "<text x=\"{left}\" y=\"{:.1}\" fill=\"#888\">skipped</text>",
                yy + 17.0
            )),
        }
    }
    svg.push_str("</svg>");
    svg
}

/// A grid: invariants across, stages down; green 0, red with the count, grey n/a.
fn audit_chart(report: &Report) -> String {
    let (cell_w, cell_h, left, top) = (74.0, 30.0, 140.0, 24.0);
    let w = left + cell_w * 8.0 + 10.0;
    let h = top + cell_h * report.runs.len() as f64 + 10.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=img \
         aria-label=\"audit per stage\">"
    );
    for i in 1..=8 {
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"16\" text-anchor=middle>I{i}</text>",
            left + cell_w * (i as f64 - 0.5)
        ));
    }
    for (k, r) in report.runs.iter().enumerate() {
        let yy = top + k as f64 * cell_h;
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=end>{}</text>",
            left - 6.0,
            yy + 19.0,
            esc(&r.label())
        ));
        for i in 1..=8 {
            let id = format!("I{i}");
            let inv = r
                .audit
                .as_ref()
                .and_then(|a| a.invariants.iter().find(|v| v.id == id));
            let (fill, text, tip) = match inv {
                Some(v) if v.status == "pass" => ("#b7e4b7", "0".to_owned(), v.name),
                Some(v) if v.status == "fail" => {
                    ("#f4a3a3", v.violations.unwrap_or(0).to_string(), v.name)
                }
                Some(v) if v.status == "not-quiet" => ("#f6d58e", "not quiet".to_owned(), v.name),
                Some(v) => ("#e6e6e6", "n/a".to_owned(), v.name),
                None => ("#f7f7f7", "-".to_owned(), "not run"),
            };
            let x = left + cell_w * (i as f64 - 1.0);
            svg.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{yy:.1}\" width=\"{}\" height=\"{}\" fill=\"{fill}\" \
                 stroke=\"#fff\"><title>{id} {}</title></rect><text x=\"{:.1}\" y=\"{:.1}\" \
                 text-anchor=middle>{text}</text>",
                cell_w - 2.0,
                cell_h - 2.0,
                esc(tip),
                x + cell_w / 2.0,
                yy + 19.0
            ));
        }
    }
    svg.push_str("</svg>");
    svg
}

fn table(report: &Report) -> String {
    let (headers, rows) = markdown_cells(report);
    let mut t = String::from("<table><tr><th></th>");
    for h in headers {
        t.push_str(&format!("<th>{}</th>", esc(&h)));
    }
    t.push_str("</tr>");
    for (label, cells) in rows {
        t.push_str(&format!("<tr><th>{}</th>", esc(&label)));
        for c in cells {
            t.push_str(&format!("<td>{}</td>", esc(&c)));
        }
        t.push_str("</tr>");
    }
    t.push_str("</table>");
    t
}

/// One line per stage: `(color index, label, points)`.
type Series = (usize, String, Vec<(f64, f64)>);

/// The run second by second: requests per second and the main operation's p99 per stage,
/// and seats sold over time against the capacity, so an oversell is a line crossing it.
fn timeline_charts(report: &Report) -> String {
    let runs: Vec<(usize, String, &crate::metrics::Timeline)> = report
        .runs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, r.label(), r.results.as_ref()?.timeline.as_ref()?)))
        .collect();
    if runs.is_empty() {
        return String::new();
    }
    let series = |f: &dyn Fn(&crate::metrics::Second) -> Option<f64>| -> Vec<Series> {
        runs.iter()
            .map(|(i, label, t)| {
                let points = t
                    .seconds
                    .iter()
                    .filter_map(|s| f(s).map(|v| (f64::from(s.t), v)))
                    .collect();
                (*i, label.clone(), points)
            })
            .collect()
    };
    let op = runs[0].2.op.clone();
    let mut out = String::from("<h2>Second by second</h2>");
    out.push_str("<h3>Requests per second</h3>");
    out.push_str(&line_chart(
        &series(&|s| Some(s.requests as f64)),
        "req/s",
        None,
        false,
    ));
    out.push_str(&format!("<h3>p99 per second: {}</h3>", esc(&op)));
    out.push_str(&line_chart(&series(&|s| s.p99_ms), "ms", None, false));
    if report.settings.scenario.buys() {
        let capacity = f64::from(report.settings.tickets) * f64::from(report.settings.events);
        out.push_str("<h3>Seats sold over time</h3>");
        out.push_str(&line_chart(
            &series(&|s| Some(s.confirmed_total as f64)),
            "tickets confirmed",
            Some((capacity, format!("capacity {capacity}"))),
            true,
        ));
    }
    out
}

/// A line chart over seconds; `hline` a dashed reference line (the capacity); `steps` draws
/// each series as a staircase (a running total).
fn line_chart(series: &[Series], unit: &str, hline: Option<(f64, String)>, steps: bool) -> String {
    let (w, h, left, bottom, top_pad, right) = (720.0, 240.0, 70.0, 30.0, 12.0, 20.0);
    let x_max = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|q| q.0))
        .fold(0.0f64, f64::max)
        + 1.0;
    let y_max = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|q| q.1))
        .chain(hline.iter().map(|(v, _)| *v))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let plot_w = w - left - right;
    let plot_h = h - bottom - top_pad;
    let x = |t: f64| left + plot_w * t / x_max;
    let y = |v: f64| top_pad + plot_h * (1.0 - v / y_max);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=img \
         aria-label=\"{} per second\">",
        esc(unit)
    );
    for k in 0..=4 {
        let v = y_max / 1.1 * f64::from(k) / 4.0;
        let yy = y(v);
        svg.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#eee\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=end>{}</text>",
            w - right,
            left - 4.0,
            yy + 4.0,
            trim_num(v)
        ));
    }
    let ticks = (x_max as u64).clamp(1, 10);
    for k in 0..=ticks {
        let t = x_max * k as f64 / ticks as f64;
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=middle>{:.0} s</text>",
            x(t),
            h - 10.0,
            t
        ));
    }
    if let Some((v, label)) = &hline {
        let yy = y(*v);
        svg.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#000\" \
             stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=end>{}</text>",
            w - right,
            w - right,
            yy - 4.0,
            esc(label)
        ));
    }
    for (i, label, points) in series {
        if points.is_empty() {
            continue;
        }
        let mut path = String::new();
        let mut last_y = None;
        for (t, v) in points {
            // a bucket covers [t, t + 1): its point is drawn at the bucket's end
            let (px, py) = (x(t + 1.0), y(*v));
            match last_y {
                None => path.push_str(&format!(
                    "{:.1},{:.1} ",
                    x(*t),
                    if steps { y(0.0) } else { py }
                )),
                Some(ly) if steps => path.push_str(&format!("{px:.1},{ly:.1} ")),
                Some(_) => {}
            }
            path.push_str(&format!("{px:.1},{py:.1} "));
            last_y = Some(py);
        }
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\">\
             <title>{}</title></polyline>",
            COLORS[i % COLORS.len()],
            path.trim_end(),
            esc(label)
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{left}\" y=\"{}\" fill=\"#666\">{}</text></svg>",
        top_pad - 2.0,
        esc(unit)
    ));
    svg
}

/// `loadgen bench`'s page: the figures with their goals, the table as printed, and each run
/// behind them (stage, server command line, rate, audit).
pub fn bench_html(report: &crate::bench::BenchReport, text: &str) -> String {
    let mut body = format!(
        "<h1>loadgen bench{}</h1><p class=meta>seed <code>{}</code> · started {} · {} cores, {} {} \
         · {:.0} s · server <code>{}</code></p><p>{}</p>",
        if report.quick { " --quick" } else { "" },
        report.seed,
        esc(&report.started_at),
        report.machine.cores,
        esc(&report.machine.os),
        esc(&report.machine.kernel),
        report.took_s,
        esc(&report.server_bin),
        if report.complete {
            "Every figure measured. Goals are reported, never asserted."
        } else {
            "NOT every figure was measured."
        }
    );
    body.push_str("<h2>Figures</h2><table><tr><th>figure</th><th>value</th><th>goal (SPEC §9)</th><th>how</th></tr>");
    for f in &report.figures {
        let value = match f.value {
            Some(v) => format!("{v:.2} {}", f.unit),
            None => "–".into(),
        };
        let goal = match (f.goal, f.met) {
            (Some(g), Some(true)) => format!("{}: met", esc(g)),
            (Some(g), Some(false)) => format!("{}: <b>not met</b>", esc(g)),
            (Some(g), None) => esc(g),
            (None, _) => String::new(),
        };
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(f.name),
            esc(&value),
            goal,
            esc(&f.how)
        ));
    }
    body.push_str("</table><h2>Runs</h2><table><tr><th>run</th><th>stage</th><th>req/s</th><th>measured</th><th>audit</th><th>server</th></tr>");
    for r in &report.runs {
        let (rps, measured) = match &r.run.results {
            Some(res) => (
                format!("{:.0}", res.achieved_rps),
                format!("{:.1} s", res.measured_s),
            ),
            None => ("–".into(), r.run.skip_reason.clone().unwrap_or_default()),
        };
        let audit = match &r.run.audit {
            Some(a) if a.ok => "ok",
            Some(_) => "NOT clean",
            None => "–",
        };
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            esc(&r.name),
            esc(&r.run.label()),
            rps,
            esc(&measured),
            audit,
            esc(&r.run.server_args.clone().unwrap_or_default().join(" "))
        ));
    }
    body.push_str(&format!(
        "</table><h2>As printed</h2><pre>{}</pre>",
        esc(text)
    ));
    page("loadgen bench", &body)
}
