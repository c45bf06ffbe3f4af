//! Link arguments for `credlet-under-test` and `credlet-bench`: the same
//! layout as `credlet`, so the benchmarks measure the binary that ships.

include!("../agent/link-order/link_args.rs");

fn main() {
    link_order("../agent/link-order/hot-functions.txt");
}
