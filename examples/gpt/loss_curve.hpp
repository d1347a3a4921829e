#pragma once
// The loss curve: one point per step, written as CSV and drawn as an SVG line chart.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "gpt/args.hpp"

namespace train_gpt {

// One point of the loss curve.
struct Point {
  int step;
  double train, val;  // val < 0: not measured at this step (NaN: measured, and not finite)
  // Whether the validation loss was measured at this step (a NaN one was: it is shown as nan).
  bool has_val() const { return !(val < 0); }
};

// The loss curve as CSV and as an SVG line chart (train loss, and validation points).
inline void write_curve(const Args& a, const std::vector<Point>& curve) {
  if (!a.loss_csv.empty()) {
    std::ofstream f(a.loss_csv);
    f << "step,train_loss,val_loss\n";
    for (const Point& p : curve) f << p.step << ',' << p.train << ',' << (p.has_val() ? std::to_string(p.val) : "") << '\n';
    f.flush();  // a full disk or a vanished file: one line naming it, exit code 1 (after training)
    TESSERA_EXPECTS(f.good(), "train_gpt: cannot write --loss-csv ", a.loss_csv, " (disk full or the file is gone)");
  }
  if (!a.loss_svg.empty() && !curve.empty()) {
    const double W = 640, H = 360, L = 50, R = 20, Tm = 30, B = 40;
    double lo = 1e300, hi = -1e300;
    const auto extend = [&](double v) {  // the finite values only (a NaN or Inf loss has no place on the chart)
      if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
    };
    for (const Point& p : curve) {
      extend(p.train);
      if (p.has_val()) extend(p.val);
    }
    if (lo > hi) lo = hi = 0;  // nothing finite
    const double s0 = curve.front().step, s1 = std::max<double>(curve.back().step, s0 + 1);
    auto X = [&](double s) { return L + (s - s0) / (s1 - s0) * (W - L - R); };
    auto Y = [&](double v) { return Tm + (hi - v) / std::max(hi - lo, 1e-9) * (H - Tm - B); };
    std::ofstream f(a.loss_svg);
    f << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H << "' font-family='sans-serif' font-size='12'>\n"
      << "<rect width='100%' height='100%' fill='white'/>\n"
      << "<text x='" << L << "' y='18'>train_gpt: loss per step (dp=" << a.dp << " pp=" << a.pp << " tp=" << a.tp
      << "), blue train, orange validation</text>\n"
      << "<line x1='" << L << "' y1='" << H - B << "' x2='" << W - R << "' y2='" << H - B << "' stroke='black'/>\n"
      << "<line x1='" << L << "' y1='" << Tm << "' x2='" << L << "' y2='" << H - B << "' stroke='black'/>\n";
    for (int i = 0; i <= 4; ++i) {
      const double v = lo + (hi - lo) * i / 4;
      f << "<text x='4' y='" << Y(v) + 4 << "'>" << std::to_string(v).substr(0, 5) << "</text>\n";
    }
    f << "<text x='" << L << "' y='" << H - 20 << "'>step " << static_cast<int>(s0) << "</text>"
      << "<text x='" << W - R - 60 << "' y='" << H - 20 << "'>step " << static_cast<int>(s1) << "</text>\n";
    f << "<polyline fill='none' stroke='#1f77b4' stroke-width='1.5' points='";
    for (const Point& p : curve)
      if (std::isfinite(p.train)) f << X(p.step) << ',' << Y(p.train) << ' ';
    f << "'/>\n<polyline fill='none' stroke='#ff7f0e' stroke-width='2' points='";
    for (const Point& p : curve)
      if (p.has_val() && std::isfinite(p.val)) f << X(p.step) << ',' << Y(p.val) << ' ';
    f << "'/>\n</svg>\n";
    f.flush();
    TESSERA_EXPECTS(f.good(), "train_gpt: cannot write --loss-svg ", a.loss_svg, " (disk full or the file is gone)");
  }
}

}  // namespace train_gpt
