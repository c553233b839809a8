//! `herd-bench-plot SPEC.json FONT.ttf`: draws the bar charts `bench/run`
//! describes, one PNG per chart, each with one panel per load: a
//! horizontal bar per setup (herd's in blue), with the spread over rounds
//! as a whisker.
#![forbid(unsafe_code)]

use plotters::prelude::*;
use plotters::style::FontStyle;
use serde::Deserialize;

#[derive(Deserialize)]
struct Chart {
    out: String,
    title: String,
    unit: String,
    panels: Vec<Panel>,
}

#[derive(Deserialize)]
struct Panel {
    title: String,
    bars: Vec<Bar>,
}

#[derive(Deserialize)]
struct Bar {
    label: String,
    value: f64,
    lo: f64,
    hi: f64,
    herd: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("herd-bench-plot: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, spec, font] = args.as_slice() else {
        return Err("usage: herd-bench-plot SPEC.json FONT.ttf".into());
    };
    let font: &'static [u8] = Box::leak(std::fs::read(font)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| "cannot read the font")?;
    let charts: Vec<Chart> = serde_json::from_str(&std::fs::read_to_string(spec)?)?;
    for c in &charts {
        draw(c)?;
    }
    Ok(())
}

fn draw(c: &Chart) -> Result<(), Box<dyn std::error::Error>> {
    let rows = c.panels.iter().map(|p| p.bars.len()).max().unwrap_or(1);
    let cols = 2usize.min(c.panels.len().max(1));
    let prow = c.panels.len().div_ceil(cols);
    let (w, h) = (1100u32, (60 + prow * (70 + rows * 26)) as u32);
    let root = BitMapBackend::new(&c.out, (w, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&c.title, ("sans-serif", 24))?;
    let areas = root.split_evenly((prow, cols));
    for (p, area) in c.panels.iter().zip(areas.iter()) {
        let max = p.bars.iter().map(|b| b.hi.max(b.value)).fold(0.0, f64::max) * 1.12;
        let n = p.bars.len();
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(150)
            .build_cartesian_2d(0.0..max.max(1e-9), (0..n).into_segmented())?;
        let labels: Vec<&str> = p.bars.iter().map(|b| b.label.as_str()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc(c.unit.as_str())
            .x_labels(6)
            .x_label_formatter(&|v| short(*v))
            .y_labels(n)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(*i).copied().unwrap_or("").to_string(),
                _ => String::new(),
            })
            .label_style(("sans-serif", 14))
            .draw()?;
        let herd = RGBColor(31, 119, 180);
        let peer = RGBColor(170, 170, 170);
        chart.draw_series(p.bars.iter().enumerate().map(|(i, b)| {
            let color = if b.herd { herd } else { peer };
            let mut r = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (b.value, SegmentValue::Exact(i + 1)),
                ],
                color.filled(),
            );
            r.set_margin(3, 3, 0, 0);
            r
        }))?;
        // The spread over rounds.
        chart.draw_series(p.bars.iter().enumerate().map(|(i, b)| {
            PathElement::new(
                vec![
                    (b.lo, SegmentValue::CenterOf(i)),
                    (b.hi, SegmentValue::CenterOf(i)),
                ],
                BLACK.stroke_width(2),
            )
        }))?;
        chart.draw_series(p.bars.iter().enumerate().map(|(i, b)| {
            Text::new(
                fmt(b.value),
                (b.hi.max(b.value) + max * 0.01, SegmentValue::CenterOf(i)),
                ("sans-serif", 13).into_font(),
            )
        }))?;
    }
    root.present()?;
    Ok(())
}

fn short(v: f64) -> String {
    if v >= 1000.0 {
        format!("{}k", (v / 1000.0 * 10.0).round() / 10.0)
    } else {
        format!("{}", (v * 100.0).round() / 100.0)
    }
}

fn fmt(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}", v)
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
