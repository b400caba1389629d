"""Running the server: tritonserver behind the gate, the stub watchdog and /dev/shm hygiene, replicas, the admin API, versions, status."""
