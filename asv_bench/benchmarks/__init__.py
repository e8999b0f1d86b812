"""flagagg's airspeed velocity benchmarks."""
