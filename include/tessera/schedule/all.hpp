#pragma once
/// @file
/// Everything in tessera::schedule: pipeline schedules as data (GPipe, OneFOneB,
/// InterleavedOneFOneB, ZeroBubbleH1, or your own Schedule), the checker, the ideal-timeline simulator, the
/// per-rank Recorder, bubble statistics, Chrome trace JSON and SVG pictures.

#include "tessera/schedule/action.hpp"
#include "tessera/schedule/bubble.hpp"
#include "tessera/schedule/checker.hpp"
#include "tessera/schedule/chrome_trace.hpp"
#include "tessera/schedule/gpipe.hpp"
#include "tessera/schedule/interleaved_one_f_one_b.hpp"
#include "tessera/schedule/one_f_one_b.hpp"
#include "tessera/schedule/recorder.hpp"
#include "tessera/schedule/schedule.hpp"
#include "tessera/schedule/simulate.hpp"
#include "tessera/schedule/step_walker.hpp"
#include "tessera/schedule/svg.hpp"
#include "tessera/schedule/timeline.hpp"
#include "tessera/schedule/zero_bubble_h1.hpp"
