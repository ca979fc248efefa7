"""What runs the processes: the supervisor that start_all.sh puts around each worker."""
