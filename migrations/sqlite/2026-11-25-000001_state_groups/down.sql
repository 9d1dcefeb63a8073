DROP TABLE current_state_events;
DROP TABLE event_to_state_groups;
DROP TABLE state_group_edges;
DROP TABLE state_groups_state;
DROP TABLE state_groups;
