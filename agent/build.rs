//! Link arguments for the `credlet` binary.

include!("link-order/link_args.rs");

fn main() {
    link_order("link-order/hot-functions.txt");
}
