// d3 v7 with d3-jetpack's helpers on the same d3-selection: what circuit-tracer's frontend gets from
// transformer-circuits.pub as d3.js + jetpack_2024-07-20.js. Built by `npm run build` into build/d3-jetpack.js.
// (d3-jetpack's own bundles carry a second d3-selection or overwrite the global d3, and its attachTooltip
// needs d3 v5's d3.event, so the parts the frontend calls are bundled here on d3 v7, with one adapter.)
import * as d3 from "d3";
import * as essentials from "d3-jetpack/essentials";
import conventions from "./node_modules/d3-jetpack/src/conventions.js";
import drawAxis from "./node_modules/d3-jetpack/src/drawAxis.js";

// the 2024 jetpack's conventions() returns c with c.drawAxis(svg); the npm one has drawAxis(c) beside it
function conventionsWithDrawAxis(options) {
  const c = conventions(options);
  c.drawAxis = (svg) => drawAxis({ ...c, svg: svg || c.svg });
  return c;
}

window.d3 = Object.assign({}, d3, essentials, { conventions: conventionsWithDrawAxis, drawAxis });
