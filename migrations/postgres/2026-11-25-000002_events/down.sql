DROP TABLE rejections;
DROP TABLE rooms;
DROP TABLE event_forward_extremities;
DROP TABLE event_auth;
DROP TABLE event_edges;
DROP TABLE event_json;
DROP TABLE events;
DROP SEQUENCE events_stream_seq;
