//! The report's PNG chart: daily faults of the top stations over the month,
//! with the threshold as a horizontal line.
//!
//! # Fonts
//! Plotters draws text through `ab_glyph` from a font file found at run
//! time: `$CSMS_REPORT_FONT`, else a few usual locations of DejaVu Sans or
//! Liberation Sans. This avoids a fontconfig/freetype build dependency. A
//! machine with none of them still gets a chart, without text (no caption,
//! axis labels or legend); the mail's table marks each charted station with
//! its line colour, so the chart stays readable.

use std::path::PathBuf;
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::ReportError;
use crate::report::{CHART_STATIONS, FaultRankingReport, daily_series};

/// Size of the chart in pixels.
pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 420;

/// Line colours of the charted stations, in rank order.
const PALETTE: [(u8, u8, u8); CHART_STATIONS] = [
    (0x1f, 0x77, 0xb4),
    (0xd6, 0x27, 0x28),
    (0x2c, 0xa0, 0x2c),
    (0xff, 0x7f, 0x0e),
    (0x94, 0x67, 0xbd),
];

fn color(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// The CSS colour of the `i`-th charted station (for the HTML table).
pub fn css_color(i: usize) -> String {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    format!("#{r:02x}{g:02x}{b:02x}")
}

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers the first usable font as plotters' "sans-serif", once; whether
/// text can be drawn.
fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let candidates = std::env::var_os("CSMS_REPORT_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(PathBuf::from));
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            // Plotters keeps fonts for the life of the process; this happens once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                tracing::debug!(font = %path.display(), "chart font");
                return true;
            }
        }
        tracing::warn!(
            "no font for report charts (set CSMS_REPORT_FONT to a .ttf): drawing without text"
        );
        false
    })
}

/// The PNG chart of the top (at most [`CHART_STATIONS`]) stations' faults
/// per day of the month.
pub fn daily_faults_png(r: &FaultRankingReport) -> Result<Vec<u8>, ReportError> {
    render(r, font_available())
}

fn chart_err(e: impl std::fmt::Display) -> ReportError {
    ReportError::Chart(e.to_string())
}

fn render(r: &FaultRankingReport, text: bool) -> Result<Vec<u8>, ReportError> {
    let stations: Vec<&str> = r
        .rows
        .iter()
        .take(CHART_STATIONS)
        .map(|x| x.station_id.as_str())
        .collect();
    let series = daily_series(r, &stations);
    let days = series.first().map_or(31, Vec::len).max(2) as u32;
    let threshold = u64::from(r.threshold);
    let top = series
        .iter()
        .flatten()
        .copied()
        .max()
        .unwrap_or(0)
        .max(threshold)
        + 1;
    // The bitmap backend encodes PNG only to a file.
    let dir = tempfile::tempdir().map_err(chart_err)?;
    let path = dir.path().join("chart.png");
    {
        let root = BitMapBackend::new(&path, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(16);
        if text {
            builder
                .caption(
                    format!("Faults per day, {}", r.month),
                    ("sans-serif", 20).into_font(),
                )
                .x_label_area_size(40)
                .y_label_area_size(48);
        }
        let mut chart = builder
            .build_cartesian_2d(1u32..days, 0u64..top)
            .map_err(chart_err)?;
        if text {
            chart
                .configure_mesh()
                .light_line_style(WHITE.mix(0.0))
                .x_desc("day of month")
                .y_desc("faults")
                .x_labels(days.min(16) as usize)
                .label_style(("sans-serif", 13).into_font())
                .draw()
                .map_err(chart_err)?;
        } else {
            // The mesh draws tick labels; without a font, only a frame.
            chart
                .draw_series([Rectangle::new([(1, 0), (days, top)], BLACK.stroke_width(1))])
                .map_err(chart_err)?;
        }
        let grey = RGBColor(0x88, 0x88, 0x88);
        let line = chart
            .draw_series(LineSeries::new(
                [(1, threshold), (days, threshold)],
                grey.stroke_width(1),
            ))
            .map_err(chart_err)?;
        if text {
            line.label(format!("threshold ({})", r.threshold))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey));
        }
        for (i, s) in series.iter().enumerate() {
            let c = color(i);
            let points = s.iter().enumerate().map(|(d, n)| (d as u32 + 1, *n));
            let drawn = chart
                .draw_series(LineSeries::new(points, c.stroke_width(2)))
                .map_err(chart_err)?;
            if text {
                drawn.label(stations[i]).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            }
            chart
                .draw_series(
                    s.iter()
                        .enumerate()
                        .filter(|(_, n)| **n > 0)
                        .map(|(d, n)| Circle::new((d as u32 + 1, *n), 3, c.filled())),
                )
                .map_err(chart_err)?;
        }
        if text {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 13).into_font())
                .draw()
                .map_err(chart_err)?;
        }
        root.present().map_err(chart_err)?;
    }
    std::fs::read(&path).map_err(|source| ReportError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample;

    /// Checks the PNG signature and reads the IHDR chunk's width and height.
    pub(crate) fn png_size(png: &[u8]) -> (u32, u32) {
        assert!(png.len() > 33, "too short for a PNG");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&png[12..16], b"IHDR", "first chunk is IHDR");
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        assert_eq!(be(&png[8..12]), 13, "IHDR length");
        (be(&png[16..20]), be(&png[20..24]))
    }

    #[test]
    fn chart_is_a_png_of_the_stated_size_with_and_without_text() {
        for text in [false, true] {
            if text && !font_available() {
                continue;
            }
            let png = render(&sample(), text).unwrap();
            assert_eq!(png_size(&png), (WIDTH, HEIGHT));
            assert!(png.ends_with(b"IEND\xae\x42\x60\x82"), "IEND chunk last");
        }
        assert_eq!(css_color(0), "#1f77b4");
        assert_eq!(css_color(CHART_STATIONS), css_color(0));
    }
}
