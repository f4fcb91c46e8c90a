/* C shims for DPDK's static-inline calls (burst I/O, mbuf access, errno)
 * and for port set-up, whose configuration structs are easier to fill in C.
 * Compiled by the top-level build.rs with the `cc` crate; bound with bindgen. */
#ifndef POLLEN_DPDK_SHIM_H
#define POLLEN_DPDK_SHIM_H

#include <stdint.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

/* What Pollen needs to know of a port, flattened from rte_eth_dev_info. */
struct pollen_port_info {
    uint16_t max_rx_queues;
    uint16_t max_tx_queues;
    uint64_t flow_type_rss_offloads;
    uint16_t min_mtu;
    uint16_t max_mtu;
    int32_t socket_id;
    uint8_t mac[6];
    char driver[32];
};

/* Counters of a port, flattened from rte_eth_stats. */
struct pollen_port_stats {
    uint64_t ipackets;
    uint64_t opackets;
    uint64_t ibytes;
    uint64_t obytes;
    uint64_t imissed;
    uint64_t ierrors;
    uint64_t oerrors;
    uint64_t rx_nombuf;
};

/* The RSS hash types Pollen asks for: IPv4 addresses and TCP ports
 * (RTE_ETH_RSS_* are function-like macros bindgen cannot evaluate). */
uint64_t pollen_rss_hash_types(void);

/* rte_errno of the calling thread. */
int pollen_errno(void);

/* 0 or a negative errno. */
int pollen_port_info(uint16_t port, struct pollen_port_info *out);
int pollen_port_stats(uint16_t port, struct pollen_port_stats *out);
/* 1 if the link is up, 0 if down, a negative errno on failure. */
int pollen_port_link_up(uint16_t port);

/* Configures `port` with `queues` rx and tx queues. `rss_hf` != 0 spreads
 * flows over the rx queues by RSS with those hash types. 0 or a negative errno. */
int pollen_port_configure(uint16_t port, uint16_t queues, uint64_t rss_hf);

uint16_t pollen_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t pollen_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);

struct rte_mbuf *pollen_pktmbuf_alloc(struct rte_mempool *pool);
/* Frees every segment of the chain. */
void pollen_pktmbuf_free(struct rte_mbuf *m);
/* The first segment's data. */
uint8_t *pollen_mbuf_data(struct rte_mbuf *m);
uint16_t pollen_mbuf_data_len(const struct rte_mbuf *m);
uint32_t pollen_mbuf_pkt_len(const struct rte_mbuf *m);
uint16_t pollen_mbuf_nb_segs(const struct rte_mbuf *m);
uint16_t pollen_mbuf_tailroom(const struct rte_mbuf *m);
/* Extends the (single-segment) data by `len` bytes; NULL if there is no room. */
uint8_t *pollen_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
/* Shortens the data to `len` bytes (len <= data_len). */
void pollen_pktmbuf_trim_to(struct rte_mbuf *m, uint16_t len);

#endif
