--
-- PostgreSQL database dump
--

\restrict zWu695KE1A12ZzROBFtDwFwd119iKgpFpxf0yeSHajoTc28Zbt1DYxYYRYFAOV2

-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: netboot_old; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA netboot_old;


--
-- Name: netboot_record_change(); Type: FUNCTION; Schema: netboot_old; Owner: -
--

CREATE FUNCTION netboot_old.netboot_record_change() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
        DECLARE
            old_key TEXT;
            new_key TEXT;
        BEGIN
            PERFORM pg_advisory_xact_lock(31073797980254068);
            IF TG_OP <> 'INSERT' THEN old_key := to_jsonb(OLD) ->> TG_ARGV[0]; END IF;
            IF TG_OP <> 'DELETE' THEN new_key := to_jsonb(NEW) ->> TG_ARGV[0]; END IF;
            IF old_key IS NOT NULL AND old_key IS DISTINCT FROM new_key THEN
                INSERT INTO changes (tbl, key) VALUES (TG_TABLE_NAME, old_key);
            END IF;
            IF new_key IS NOT NULL THEN
                INSERT INTO changes (tbl, key) VALUES (TG_TABLE_NAME, new_key);
            END IF;
            -- Delivered at commit, once per transaction (equal notifications fold into one).
            PERFORM pg_notify('netboot_changes', '');
            RETURN NULL;
        END $$;


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: api_tokens; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.api_tokens (
    name text NOT NULL COLLATE pg_catalog."C",
    sha256 text NOT NULL COLLATE pg_catalog."C",
    scope text NOT NULL,
    created double precision NOT NULL,
    expires double precision,
    last_used double precision
);


--
-- Name: audit; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.audit (
    id bigint NOT NULL,
    "time" double precision NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    peer text NOT NULL,
    outcome text NOT NULL
);


--
-- Name: audit_id_seq; Type: SEQUENCE; Schema: netboot_old; Owner: -
--

CREATE SEQUENCE netboot_old.audit_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: audit_id_seq; Type: SEQUENCE OWNED BY; Schema: netboot_old; Owner: -
--

ALTER SEQUENCE netboot_old.audit_id_seq OWNED BY netboot_old.audit.id;


--
-- Name: changes; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.changes (
    seq bigint NOT NULL,
    tbl text NOT NULL COLLATE pg_catalog."C",
    key text NOT NULL COLLATE pg_catalog."C"
);


--
-- Name: changes_seq_seq; Type: SEQUENCE; Schema: netboot_old; Owner: -
--

CREATE SEQUENCE netboot_old.changes_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: changes_seq_seq; Type: SEQUENCE OWNED BY; Schema: netboot_old; Owner: -
--

ALTER SEQUENCE netboot_old.changes_seq_seq OWNED BY netboot_old.changes.seq;


--
-- Name: clusters; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.clusters (
    name text NOT NULL COLLATE pg_catalog."C",
    data text NOT NULL
);


--
-- Name: events; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.events (
    id bigint NOT NULL,
    machine text NOT NULL COLLATE pg_catalog."C",
    "time" double precision NOT NULL,
    kind text NOT NULL,
    message text NOT NULL,
    data text NOT NULL
);


--
-- Name: events_id_seq; Type: SEQUENCE; Schema: netboot_old; Owner: -
--

CREATE SEQUENCE netboot_old.events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: events_id_seq; Type: SEQUENCE OWNED BY; Schema: netboot_old; Owner: -
--

ALTER SEQUENCE netboot_old.events_id_seq OWNED BY netboot_old.events.id;


--
-- Name: groups; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.groups (
    name text NOT NULL COLLATE pg_catalog."C",
    data text NOT NULL
);


--
-- Name: leases; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.leases (
    mac text NOT NULL COLLATE pg_catalog."C",
    ipv4 text NOT NULL COLLATE pg_catalog."C",
    expires double precision NOT NULL,
    hostname text
);


--
-- Name: machine_keys; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.machine_keys (
    kind text NOT NULL COLLATE pg_catalog."C",
    value text NOT NULL COLLATE pg_catalog."C",
    machine text NOT NULL COLLATE pg_catalog."C"
);


--
-- Name: machine_labels; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.machine_labels (
    machine text NOT NULL COLLATE pg_catalog."C",
    key text NOT NULL COLLATE pg_catalog."C",
    value text NOT NULL COLLATE pg_catalog."C"
);


--
-- Name: machines; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.machines (
    id text NOT NULL COLLATE pg_catalog."C",
    mac text COLLATE pg_catalog."C",
    hostname text COLLATE pg_catalog."C",
    state text NOT NULL COLLATE pg_catalog."C",
    cluster text COLLATE pg_catalog."C",
    data text NOT NULL,
    created double precision NOT NULL,
    updated double precision NOT NULL
);


--
-- Name: profiles; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.profiles (
    name text NOT NULL COLLATE pg_catalog."C",
    data text NOT NULL
);


--
-- Name: schema_migrations; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.schema_migrations (
    version integer NOT NULL,
    description text NOT NULL,
    applied double precision NOT NULL
);


--
-- Name: settings; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.settings (
    key text NOT NULL COLLATE pg_catalog."C",
    value text NOT NULL
);


--
-- Name: audit id; Type: DEFAULT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.audit ALTER COLUMN id SET DEFAULT nextval('netboot_old.audit_id_seq'::regclass);


--
-- Name: changes seq; Type: DEFAULT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.changes ALTER COLUMN seq SET DEFAULT nextval('netboot_old.changes_seq_seq'::regclass);


--
-- Name: events id; Type: DEFAULT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.events ALTER COLUMN id SET DEFAULT nextval('netboot_old.events_id_seq'::regclass);


--
-- Data for Name: api_tokens; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.api_tokens (name, sha256, scope, created, expires, last_used) FROM stdin;
admin	6f27bfe5db102e4c0805d72badbec1a8f159a51a4651b75827a33829e562fa2a	admin	1796539316.703756	\N	\N
ci	fcd492c8cd96e7d3e4397c1f18e35512a7299d1a09e268eb7cc3d1c10f1071f9	operator	1796539311.0887938	\N	1796539318.1874056
\.


--
-- Data for Name: audit; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.audit (id, "time", actor, action, target, peer, outcome) FROM stdin;
1	1796539286.4737194	cli:root	clusters add	edge	local	ok
2	1796539290.752343	cli:root	profiles add	k3os	local	ok
3	1796539294.9464643	cli:root	groups add	rack1	local	ok
4	1796539299.4922838	cli:root	machines add	52:54:00:30:00:01	local	ok
5	1796539303.0527992	cli:root	machines add	52:54:00:30:00:02	local	ok
6	1796539307.0440435	cli:root	machines add	52:54:00:30:00:03	local	ok
7	1796539311.1199906	cli:root	tokens create	ci	local	ok
8	1796539319.3122368	machine:m-8a47f3227ba5	POST /api/v1/machines/{ref}/events	52:54:00:30:00:01	127.0.0.1	201
9	1796539319.5083473	machine:m-8a47f3227ba5	POST /api/v1/register	m-8a47f3227ba5	127.0.0.1	200
\.


--
-- Data for Name: changes; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.changes (seq, tbl, key) FROM stdin;
1	settings	secrets-key-id
2	clusters	edge
3	profiles	k3os
4	groups	rack1
5	machines	m-8a47f3227ba5
6	machines	m-0e4d64248b1d
7	machines	m-0967e291c81d
8	settings	cluster-init/edge
9	machines	m-8a47f3227ba5
10	machines	m-8a47f3227ba5
11	machines	m-8a47f3227ba5
12	machines	m-8a47f3227ba5
13	machines	m-0e4d64248b1d
14	machines	m-7fd471929afb
\.


--
-- Data for Name: clusters; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.clusters (name, data) FROM stdin;
edge	{"name":"edge","server_url":"managed","token":"nbs1:6f14a46e2174e774:3mWBMbK1ROK4eGBHBLXE6wkSloJSl7Ycz_ACIKKxZgFi6GUf-s5pjB02S2WQRwCbHDI6AtcMv5sCtynHY1pYaJbdzb3P_to_qDQ12pph9HsOWgvMUuAf4FNGn60","labels":{},"taints":[],"description":"","endpoint":"k3s.example"}
\.


--
-- Data for Name: events; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.events (id, machine, "time", kind, message, data) FROM stdin;
1	m-8a47f3227ba5	1796539299.4388218	enrolled	added with the CLI	{}
2	m-0e4d64248b1d	1796539302.9694455	enrolled	added with the CLI	{}
3	m-0967e291c81d	1796539306.9673505	enrolled	added with the CLI	{}
4	m-8a47f3227ba5	1796539318.3318012	install-plan	install profile k3os into cluster edge as server	{"via":"http","firmware":"ipxe","arch":"x86_64","mac":"52:54:00:30:00:01","peer":"127.0.0.1"}
5	m-8a47f3227ba5	1796539319.1545749	config	k3OS config fetched	{}
6	m-8a47f3227ba5	1796539319.264731	installed		{}
7	m-8a47f3227ba5	1796539319.4522245	registered	registered at 192.0.2.51 (reported) as node-1; ignored peer address '127.0.0.1' (loopback); its install token is spent	{"addresses":["192.0.2.51"],"peer":"127.0.0.1","refused":[{"address":"127.0.0.1","reason":"loopback","source":"peer"}]}
8	m-0e4d64248b1d	1796539319.5795822	install-plan	install profile k3os into cluster edge as agent	{"via":"http","firmware":"ipxe","arch":"x86_64","mac":"52:54:00:30:00:02","peer":"127.0.0.1"}
9	m-7fd471929afb	1796539319.7460263	discovered	unknown ipxe/x86_64 machine seen via http	{"via":"http","firmware":"ipxe","arch":"x86_64","mac":"52:54:00:30:00:09","peer":"127.0.0.1"}
\.


--
-- Data for Name: groups; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.groups (name, data) FROM stdin;
rack1	{"name":"rack1","selector":{"rack":["r1"]},"profile":"k3os","cluster":"edge","role":null,"labels":{},"taints":[],"hostname_template":null,"loader":null}
\.


--
-- Data for Name: leases; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.leases (mac, ipv4, expires, hostname) FROM stdin;
\.


--
-- Data for Name: machine_keys; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.machine_keys (kind, value, machine) FROM stdin;
mac	52:54:00:30:00:01	m-8a47f3227ba5
mac	52:54:00:30:00:02	m-0e4d64248b1d
mac	52:54:00:30:00:03	m-0967e291c81d
mac	52:54:00:30:00:09	m-7fd471929afb
serial	S-UNKNOWN	m-7fd471929afb
\.


--
-- Data for Name: machine_labels; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.machine_labels (machine, key, value) FROM stdin;
m-0967e291c81d	rack	r1
\.


--
-- Data for Name: machines; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.machines (id, mac, hostname, state, cluster, data, created, updated) FROM stdin;
m-0967e291c81d	52:54:00:30:00:03	node-3	enrolled	\N	{"id":"m-0967e291c81d","macs":["52:54:00:30:00:03"],"state":"enrolled","hostname":"node-3","uuid":null,"serial":null,"asset":null,"labels":{"rack":"r1"},"cluster":null,"role":null,"profile":null,"loader":null,"arch":null,"firmware":null,"ipv4":null,"fixed_ipv4":null,"facts":{},"token_hash":null,"token_expires":null,"install_token":null,"created":1796539306.9673505,"updated":1796539306.9673505}	1796539306.9673505	1796539306.9673505
m-8a47f3227ba5	52:54:00:30:00:01	node-1	registered	edge	{"id":"m-8a47f3227ba5","macs":["52:54:00:30:00:01"],"state":"registered","hostname":"node-1","uuid":null,"serial":null,"asset":null,"labels":{},"cluster":"edge","role":"server","profile":"k3os","loader":null,"arch":"x86_64","firmware":"ipxe","ipv4":"192.0.2.51","fixed_ipv4":null,"facts":{"remote_addr":"127.0.0.1","install_peer":"127.0.0.1","machine_id":"m-1"},"token_hash":"c36d24bf0436cad9492f20ffad1a6ac472bbc591a3d9860d877bd586813725b2","token_expires":1796542918.3314183,"install_token":null,"created":1796539299.4388218,"updated":1796539319.3556042}	1796539299.4388218	1796539319.3556042
m-0e4d64248b1d	52:54:00:30:00:02	node-2	booting	edge	{"id":"m-0e4d64248b1d","macs":["52:54:00:30:00:02"],"state":"booting","hostname":"node-2","uuid":null,"serial":null,"asset":null,"labels":{},"cluster":"edge","role":"agent","profile":"k3os","loader":null,"arch":"x86_64","firmware":"ipxe","ipv4":null,"fixed_ipv4":null,"facts":{"remote_addr":"127.0.0.1","install_peer":"127.0.0.1"},"token_hash":"234da2575e9003e4a901bcbdb7cd6e864555d1707022c7b521d27509020473ab","token_expires":1796542919.579484,"install_token":"nbs1:6f14a46e2174e774:ygW3Cq-UiWYd-pf8x2XU5NhAA-wafWUPJsIzgQRu43LhloWS-dHk6PuvMHxrPV8OgRjQxSCsObdAmJ4k","created":1796539302.9694455,"updated":1796539319.579484}	1796539302.9694455	1796539319.579484
m-7fd471929afb	52:54:00:30:00:09	\N	discovered	\N	{"id":"m-7fd471929afb","macs":["52:54:00:30:00:09"],"state":"discovered","hostname":null,"uuid":null,"serial":"S-UNKNOWN","asset":null,"labels":{},"cluster":null,"role":null,"profile":null,"loader":null,"arch":"x86_64","firmware":"ipxe","ipv4":null,"fixed_ipv4":null,"facts":{"manufacturer":"QEMU","remote_addr":"127.0.0.1"},"token_hash":null,"token_expires":null,"install_token":null,"created":1796539319.6541023,"updated":1796539319.6541023}	1796539319.6541023	1796539319.6541023
\.


--
-- Data for Name: profiles; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.profiles (name, data) FROM stdin;
k3os	{"name":"k3os","kernel":"vmlinuz","initrds":["initrd.img"],"cmdline":"","config_template":"k3os","assets":[],"install_device":"/dev/sda","iso_url":null,"ssh_authorized_keys":[],"fdtdir":null,"loader":null,"description":"","install_timeout":null}
\.


--
-- Data for Name: schema_migrations; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.schema_migrations (version, description, applied) FROM stdin;
1	the inventory: machines, identifiers, labels, profiles, clusters, groups, events, leases, settings, API tokens, audit log, change feed	1796539286.3192334
2	drop the UUID and serial expression indexes: machine_keys answers every lookup by identifier (as in SQLite's migration 6)	1796539286.3206425
3	drop the (state, mac) index (as in SQLite's migration 7): counts by state come from the view or one grouped scan; without an index on state, a state change is a HOT update where the page has room	1796539286.3209155
\.


--
-- Data for Name: settings; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.settings (key, value) FROM stdin;
secrets-key-id	6f14a46e2174e774
cluster-init/edge	m-8a47f3227ba5
\.


--
-- Name: audit_id_seq; Type: SEQUENCE SET; Schema: netboot_old; Owner: -
--

SELECT pg_catalog.setval('netboot_old.audit_id_seq', 9, true);


--
-- Name: changes_seq_seq; Type: SEQUENCE SET; Schema: netboot_old; Owner: -
--

SELECT pg_catalog.setval('netboot_old.changes_seq_seq', 14, true);


--
-- Name: events_id_seq; Type: SEQUENCE SET; Schema: netboot_old; Owner: -
--

SELECT pg_catalog.setval('netboot_old.events_id_seq', 9, true);


--
-- Name: api_tokens api_tokens_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.api_tokens
    ADD CONSTRAINT api_tokens_pkey PRIMARY KEY (name);


--
-- Name: api_tokens api_tokens_sha256_key; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.api_tokens
    ADD CONSTRAINT api_tokens_sha256_key UNIQUE (sha256);


--
-- Name: audit audit_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.audit
    ADD CONSTRAINT audit_pkey PRIMARY KEY (id);


--
-- Name: changes changes_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.changes
    ADD CONSTRAINT changes_pkey PRIMARY KEY (seq);


--
-- Name: clusters clusters_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.clusters
    ADD CONSTRAINT clusters_pkey PRIMARY KEY (name);


--
-- Name: events events_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (id);


--
-- Name: groups groups_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.groups
    ADD CONSTRAINT groups_pkey PRIMARY KEY (name);


--
-- Name: leases leases_ipv4_key; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.leases
    ADD CONSTRAINT leases_ipv4_key UNIQUE (ipv4);


--
-- Name: leases leases_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.leases
    ADD CONSTRAINT leases_pkey PRIMARY KEY (mac);


--
-- Name: machine_keys machine_keys_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.machine_keys
    ADD CONSTRAINT machine_keys_pkey PRIMARY KEY (kind, value);


--
-- Name: machine_labels machine_labels_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.machine_labels
    ADD CONSTRAINT machine_labels_pkey PRIMARY KEY (machine, key);


--
-- Name: machines machines_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.machines
    ADD CONSTRAINT machines_pkey PRIMARY KEY (id);


--
-- Name: profiles profiles_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.profiles
    ADD CONSTRAINT profiles_pkey PRIMARY KEY (name);


--
-- Name: schema_migrations schema_migrations_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);


--
-- Name: settings settings_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.settings
    ADD CONSTRAINT settings_pkey PRIMARY KEY (key);


--
-- Name: audit_time; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX audit_time ON netboot_old.audit USING btree ("time", id);


--
-- Name: events_machine; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX events_machine ON netboot_old.events USING btree (machine, id);


--
-- Name: machine_keys_machine; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX machine_keys_machine ON netboot_old.machine_keys USING btree (machine);


--
-- Name: machine_labels_kv; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX machine_labels_kv ON netboot_old.machine_labels USING btree (key, value, machine);


--
-- Name: machines_cluster; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX machines_cluster ON netboot_old.machines USING btree (cluster, mac);


--
-- Name: machines_hostname; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE UNIQUE INDEX machines_hostname ON netboot_old.machines USING btree (translate(hostname, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'::text, 'abcdefghijklmnopqrstuvwxyz'::text)) WHERE (hostname IS NOT NULL);


--
-- Name: machines_no_mac; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX machines_no_mac ON netboot_old.machines USING btree (id) WHERE (mac IS NULL);


--
-- Name: machines_order; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX machines_order ON netboot_old.machines USING btree (((mac IS NULL)), mac, id);


--
-- Name: clusters clusters_changes; Type: TRIGGER; Schema: netboot_old; Owner: -
--

CREATE TRIGGER clusters_changes AFTER INSERT OR DELETE OR UPDATE ON netboot_old.clusters FOR EACH ROW EXECUTE FUNCTION netboot_old.netboot_record_change('name');


--
-- Name: groups groups_changes; Type: TRIGGER; Schema: netboot_old; Owner: -
--

CREATE TRIGGER groups_changes AFTER INSERT OR DELETE OR UPDATE ON netboot_old.groups FOR EACH ROW EXECUTE FUNCTION netboot_old.netboot_record_change('name');


--
-- Name: machines machines_changes; Type: TRIGGER; Schema: netboot_old; Owner: -
--

CREATE TRIGGER machines_changes AFTER INSERT OR DELETE OR UPDATE ON netboot_old.machines FOR EACH ROW EXECUTE FUNCTION netboot_old.netboot_record_change('id');


--
-- Name: profiles profiles_changes; Type: TRIGGER; Schema: netboot_old; Owner: -
--

CREATE TRIGGER profiles_changes AFTER INSERT OR DELETE OR UPDATE ON netboot_old.profiles FOR EACH ROW EXECUTE FUNCTION netboot_old.netboot_record_change('name');


--
-- Name: settings settings_changes; Type: TRIGGER; Schema: netboot_old; Owner: -
--

CREATE TRIGGER settings_changes AFTER INSERT OR DELETE OR UPDATE ON netboot_old.settings FOR EACH ROW EXECUTE FUNCTION netboot_old.netboot_record_change('key');


--
-- Name: machine_keys machine_keys_machine_fkey; Type: FK CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.machine_keys
    ADD CONSTRAINT machine_keys_machine_fkey FOREIGN KEY (machine) REFERENCES netboot_old.machines(id) ON DELETE CASCADE;


--
-- Name: machine_labels machine_labels_machine_fkey; Type: FK CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.machine_labels
    ADD CONSTRAINT machine_labels_machine_fkey FOREIGN KEY (machine) REFERENCES netboot_old.machines(id) ON DELETE CASCADE;


--
-- PostgreSQL database dump complete
--

\unrestrict zWu695KE1A12ZzROBFtDwFwd119iKgpFpxf0yeSHajoTc28Zbt1DYxYYRYFAOV2

