//! TEMP stub
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub zone: String,
    pub capacity: u64,
    pub allocated: u64,
    pub free: u64,
    pub placeable: bool,
}
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("x")]
    X,
}
pub struct Placer {
    nodes: Vec<Candidate>,
    r: usize,
}
impl Placer {
    pub fn new(
        nodes: Vec<Candidate>,
        replicas: usize,
        _s: usize,
    ) -> Result<Placer, PlacementError> {
        Ok(Placer { nodes, r: replicas })
    }
    pub fn place(&mut self, chunks: u64, _cs: u64) -> Result<Vec<Vec<String>>, PlacementError> {
        let ids: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.placeable)
            .map(|n| n.id.clone())
            .collect();
        if ids.len() < self.r {
            return Err(PlacementError::X);
        }
        Ok((0..chunks)
            .map(|i| {
                (0..self.r)
                    .map(|k| ids[(i as usize + k) % ids.len()].clone())
                    .collect()
            })
            .collect())
    }
    pub fn replace(
        &mut self,
        current: &[String],
        _lost: &str,
        _cs: u64,
    ) -> Result<String, PlacementError> {
        self.nodes
            .iter()
            .find(|n| n.placeable && !current.contains(&n.id))
            .map(|n| n.id.clone())
            .ok_or(PlacementError::X)
    }
    pub fn copysets(&self) -> &[Vec<String>] {
        &[]
    }
}
