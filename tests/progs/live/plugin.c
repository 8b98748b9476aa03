long plugin_fn(long x) { return x ^ (x >> 3); }
