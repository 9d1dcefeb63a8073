DROP TABLE port_progress;
